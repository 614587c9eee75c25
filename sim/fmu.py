"""An FMU as the plant: FMI 2.0 through fmpy (the optional extra ``hmpc[fmu]``).

:class:`FMUPlant` runs a Functional Mock-up Unit (Model Exchange or Co-Simulation) as a
sample-and-hold plant of the closed loop (:class:`sim.closed_loop.Plant`): each control
interval is one simulation of the FMU from the previous interval's final state with the
inputs held constant, and the plug-in's sensors read its true values
(:class:`sim.sensors.PlantSensors`, as on the virtual bioreactor).

What connects the FMU to a process plug-in is a *variable map*, a small TOML file (by
default beside the FMU, with the FMU's name and the suffix ``.toml``)::

    [meta]
    process = "amribt"                 # the plug-in the map is written for
    title = "..."

    # plug-in state = factor x FMU variable; `start` names the FMU parameter that starts a
    # run from the state (times the FMU value of the `start_times` state, e.g. a mass
    # from a concentration and the volume)
    [states]
    viable_cells = { fmu = "bioreactor.c[1]", unit = "1e9 cells/L", factor = 1.0,
                     start = "bioreactor.m_start[1]", start_times = "volume" }
    volume = { fmu = "bioreactor.V", unit = "L", factor = 1.0, start = "bioreactor.V_start" }

    # the FMU's own states carried from one interval to the next: start parameter = variable
    [restart]
    "bioreactor.V_start" = "bioreactor.V"

    # an input the FMU takes through a time table (rows [i,1] time h, [i,2] value); or
    # { variable = "..." } for an FMU input variable; FMU value = plug-in value / factor
    [inputs]
    feed_rate = { table = "dosagescheme.table", rows = 10, unit = "L/h", factor = 1.0 }

    # optional: the plug-in's kinetic rates the FMU computes (read like the states)
    [rates]
    growth_rate = { fmu = "bioreactor.culture.mu", unit = "1/h", factor = 1.0 }

    # kinetic parameter / process field -> FMU parameter (FMU value = value / factor)
    [parameters]
    mu_d_max = "bioreactor.culture.mu_d_max"
    [process]
    feed_glucose = { fmu = "feedtank.c_in[4]", factor = 1.0 }

Units are never converted silently: each state's and input's ``unit`` must be the
plug-in's canonical unit, and ``factor`` states the conversion from the FMU's.

The FMU time is the culture age in hours. One FMU instance is reused for the whole batch
(``reset()`` between intervals): creating an instance per interval exhausts the process
after some hundreds of intervals.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from plant_models.config import check_keys, load_toml
from plant_models.errors import ConfigError, IntegrationError, ModelError
from plant_models.process import ProcessPlugin, get_process
from sim.plant import clamp_inputs
from sim.sensors import Measurement, PlantSensors, SensorSpec, default_sensor_spec

__all__ = ["FMUPlant", "FMUVariableMap", "load_variable_map"]

log = logging.getLogger(__name__)

_INSTALL = "pip install 'hmpc[fmu]'"


@dataclasses.dataclass(frozen=True)
class StateLink:
    """A plug-in state read from an FMU variable: ``value = factor * fmu value``."""

    name: str
    fmu: str
    unit: str
    factor: float = 1.0
    start: str | None = None
    start_times: str | None = None


@dataclasses.dataclass(frozen=True)
class InputLink:
    """A plug-in input given to the FMU: through a time table (``table``, ``rows``) or an
    input variable (``variable``); ``fmu value = value / factor``."""

    name: str
    unit: str
    factor: float = 1.0
    table: str | None = None
    rows: int = 0
    variable: str | None = None


@dataclasses.dataclass(frozen=True)
class ParameterLink:
    """A plug-in parameter or process field set in the FMU: ``fmu value = value / factor``."""

    name: str
    fmu: str
    factor: float = 1.0


@dataclasses.dataclass(frozen=True)
class FMUVariableMap:
    """How an FMU's variables stand for a process plug-in's (see the module docstring)."""

    path: str
    process: str
    title: str
    states: tuple[StateLink, ...]
    rates: tuple[StateLink, ...]
    restart: Mapping[str, str]
    inputs: tuple[InputLink, ...]
    parameters: tuple[ParameterLink, ...]
    process_fields: tuple[ParameterLink, ...]

    def fmu_names(self) -> set[str]:
        """Every FMU variable or parameter the map names."""
        names = {s.fmu for s in self.states + self.rates}
        names |= {s.start for s in self.states if s.start}
        names |= set(self.restart) | set(self.restart.values())
        names |= {p.fmu for p in self.parameters + self.process_fields}
        for i in self.inputs:
            if i.variable:
                names.add(i.variable)
            else:
                names |= {f"{i.table}[{r},{c}]" for r in range(1, i.rows + 1) for c in (1, 2)}
        return names


def _factor(entry: Mapping[str, Any], where: str) -> float:
    value = entry.get("factor", 1.0)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{where}: factor must be a number, got {value!r}.")
    if not (math.isfinite(value) and value != 0.0):
        raise ConfigError(f"{where}: factor must be finite and non-zero, got {value!r}.")
    return float(value)


def _text(entry: Mapping[str, Any], key: str, where: str) -> str:
    value = entry.get(key)
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: {key} must be a non-empty string, got {value!r}.")
    return value


def _table(data: Mapping[str, Any], key: str, where: str) -> dict[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{where} [{key}]: must be a table.")
    return value


def _parameter_links(table: Mapping[str, Any], where: str) -> tuple[ParameterLink, ...]:
    out = []
    for name, entry in table.items():
        w = f"{where} {name}"
        if isinstance(entry, str):
            out.append(ParameterLink(name, entry))
            continue
        if not isinstance(entry, dict):
            raise ConfigError(
                f"{w}: expected an FMU parameter name or {{ fmu = ..., factor = ... }}."
            )
        check_keys(entry, ["fmu", "factor"], w, required=["fmu"])
        out.append(ParameterLink(name, _text(entry, "fmu", w), _factor(entry, w)))
    return tuple(out)


def load_variable_map(path: str | Path) -> FMUVariableMap:
    """Read and check an FMU variable map (the module docstring shows its form).

    Raises:
        ConfigError: unknown or missing keys, a non-numeric or zero factor, an input that
            names neither a table nor a variable; the message names the file and key.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(
            f"{p}: no FMU variable map. An FMU plant needs one beside the .fmu (same name, "
            ".toml) mapping the FMU's variables to the process's states and inputs; the form "
            "is in sim/fmu.py, an example in examples/hmpc_amribt/hmpc_amribt/fmu/."
        )
    data = load_toml(p)
    where = str(p)
    check_keys(
        data,
        ["meta", "states", "rates", "restart", "inputs", "parameters", "process"],
        where,
        required=["meta", "states"],
    )
    meta = _table(data, "meta", where)
    check_keys(meta, ["process", "title", "description"], f"{where} [meta]", required=["process"])
    states = []
    for name, entry in _table(data, "states", where).items():
        w = f"{where} [states] {name}"
        if not isinstance(entry, dict):
            raise ConfigError(f"{w}: expected {{ fmu = ..., unit = ..., factor = ... }}.")
        check_keys(
            entry,
            ["fmu", "unit", "factor", "fmu_unit", "start", "start_times"],
            w,
            required=["fmu", "unit"],
        )
        states.append(
            StateLink(
                name,
                _text(entry, "fmu", w),
                _text(entry, "unit", w),
                _factor(entry, w),
                _text(entry, "start", w) if "start" in entry else None,
                _text(entry, "start_times", w) if "start_times" in entry else None,
            )
        )
    rates = []
    for name, entry in _table(data, "rates", where).items():
        w = f"{where} [rates] {name}"
        if not isinstance(entry, dict):
            raise ConfigError(f"{w}: expected {{ fmu = ..., unit = ..., factor = ... }}.")
        check_keys(entry, ["fmu", "unit", "factor", "fmu_unit"], w, required=["fmu", "unit"])
        rates.append(
            StateLink(name, _text(entry, "fmu", w), _text(entry, "unit", w), _factor(entry, w))
        )
    names = {s.name for s in states}
    for s in states:
        if s.start_times is not None and s.start_times not in names:
            raise ConfigError(
                f"{where} [states] {s.name}: start_times {s.start_times!r} is not a mapped "
                f"state ({', '.join(sorted(names))})."
            )
    restart = _table(data, "restart", where)
    for key, value in restart.items():
        if not isinstance(value, str):
            raise ConfigError(f"{where} [restart] {key}: expected the FMU variable's name.")
    inputs = []
    for name, entry in _table(data, "inputs", where).items():
        w = f"{where} [inputs] {name}"
        if not isinstance(entry, dict):
            raise ConfigError(f"{w}: expected {{ table = ..., rows = ..., unit = ... }}.")
        check_keys(entry, ["table", "rows", "variable", "unit", "factor"], w, required=["unit"])
        if ("table" in entry) == ("variable" in entry):
            raise ConfigError(f"{w}: give either table (with rows) or variable.")
        rows = entry.get("rows", 2 if "table" in entry else 0)
        if "table" in entry and (isinstance(rows, bool) or not isinstance(rows, int) or rows < 2):
            raise ConfigError(f"{w}: rows must be an integer >= 2, got {rows!r}.")
        inputs.append(
            InputLink(
                name,
                _text(entry, "unit", w),
                _factor(entry, w),
                _text(entry, "table", w) if "table" in entry else None,
                int(rows),
                _text(entry, "variable", w) if "variable" in entry else None,
            )
        )
    return FMUVariableMap(
        str(p),
        _text(meta, "process", f"{where} [meta]"),
        str(meta.get("title", "")),
        tuple(states),
        tuple(rates),
        dict(restart),
        tuple(inputs),
        _parameter_links(_table(data, "parameters", where), f"{where} [parameters]"),
        _parameter_links(_table(data, "process", where), f"{where} [process]"),
    )


def _import_fmpy() -> Any:
    try:
        import fmpy
        import fmpy.fmi2
    except ImportError as exc:
        raise ConfigError(
            f"the FMU plant needs fmpy, which is not installed ({exc}); install the extra: "
            f"{_INSTALL}"
        ) from None
    return fmpy


class FMUPlant:
    """An FMU run as the plant of a process plug-in, with the plug-in's probes and assays.

    Satisfies :class:`sim.closed_loop.Plant`. :meth:`step` holds the (clamped) inputs for
    ``dt_h`` hours: one FMU simulation from the previous final state, restarted through the
    map's ``[restart]`` start parameters. The true values are the mapped FMU variables in
    the plug-in's names and units, with viability and total viable cells
    (:meth:`ProcessPlugin.derived_values`); :meth:`true_rates` are the rates the map's
    ``[rates]`` reads (none: empty).

    Args:
        fmu: the ``.fmu`` file (FMI 2.0).
        process_plugin: the process plug-in (or its registered name).
        process: the process specification (default: the plug-in's file): initial state,
            input bounds, limits and the process fields of the map's ``[process]``.
        parameters: kinetic parameters set in the FMU through the map's ``[parameters]``
            (default: the plug-in's truth kinetics; ignored when the map has none, and the
            FMU keeps its own).
        variable_map: the map (default: beside the FMU, ``<name>.toml``).
        sensors: probes and assays (default: the plug-in's).
        seed: seed of the sensor noise.
        plant_id: the batch's name (default: the FMU's file name without suffix).
        viability: viability of the inoculum (default: the plug-in's initial state).
        relative_tolerance: of the FMU's solver (Model Exchange: fmpy's CVode).
    Raises:
        ConfigError: fmpy missing, an unusable FMU or map, a map for another plug-in, a
            unit that is not the plug-in's, a sensor on an unmapped variable.
    """

    def __init__(
        self,
        fmu: str | Path,
        process_plugin: str | ProcessPlugin,
        *,
        process: Any = None,
        parameters: Any = None,
        variable_map: str | Path | None = None,
        sensors: SensorSpec | None = None,
        seed: int = 0,
        plant_id: str | None = None,
        viability: float | None = None,
        relative_tolerance: float = 1e-10,
    ) -> None:
        fmpy = _import_fmpy()
        self.fmu_path = Path(fmu)
        if not self.fmu_path.is_file():
            raise ConfigError(f"{self.fmu_path}: FMU file not found.")
        self.plugin = get_process(process_plugin)
        self.kind = self.plugin.name
        self.process = process if process is not None else self.plugin.load_process()[0]
        map_path = (
            Path(variable_map) if variable_map is not None else self.fmu_path.with_suffix(".toml")
        )
        self.variables = load_variable_map(map_path)
        if self.variables.process != self.plugin.name:
            raise ConfigError(
                f"{map_path} [meta] process = {self.variables.process!r}, but the plant runs "
                f"the {self.plugin.name!r} plug-in; use a map written for it."
            )
        if parameters is None and self.variables.parameters:
            parameters = self.plugin.load_truth_parameters()[0]
        if parameters is None:
            parameters = self.plugin.load_parameters()[0]
        self.parameters = parameters
        model = self.plugin.model(parameters, self.process)
        self._state_units = {s.name: s.unit for s in model.states}
        self._input_units = {s.name: s.unit for s in model.inputs}
        self._rate_units = {s.name: s.unit for s in model.rate_specs}
        self._input_names = model.input_names
        self.bounds: dict[str, tuple[float, float]] = model.operating_bounds()  # type: ignore[attr-defined]
        self.sensors = sensors or default_sensor_spec(self.plugin)
        self._check_map(map_path)
        self._plant_id = plant_id or self.fmu_path.stem
        self.relative_tolerance = float(relative_tolerance)
        self.readings = PlantSensors(self.sensors, seed)
        self.clamped_inputs = 0
        self.time_h = 0.0

        md = fmpy.read_model_description(str(self.fmu_path), validate=False)
        if md.fmiVersion != "2.0":
            raise ConfigError(f"{self.fmu_path}: FMI {md.fmiVersion}; the FMU plant runs FMI 2.0.")
        self._md = md
        self._refs = {v.name: v.valueReference for v in md.modelVariables}
        missing = sorted(n for n in self.variables.fmu_names() if n not in self._refs)
        if missing:
            raise ConfigError(
                f"{map_path}: the FMU {self.fmu_path.name} has no variable(s) {missing}."
            )
        self._unzipdir = fmpy.extract(str(self.fmu_path))
        self._cleanup = weakref.finalize(self, shutil.rmtree, self._unzipdir, True)
        if md.modelExchange is not None:
            iface, cls = md.modelExchange, fmpy.fmi2.FMU2Model
        elif md.coSimulation is not None:
            iface, cls = md.coSimulation, fmpy.fmi2.FMU2Slave
        else:  # pragma: no cover - a valid FMU has at least one interface
            raise ConfigError(f"{self.fmu_path}: neither Model Exchange nor Co-Simulation.")
        self._fmu: Any = cls(
            guid=md.guid,
            unzipDirectory=self._unzipdir,
            modelIdentifier=iface.modelIdentifier,
            instanceName=self._plant_id,
        )
        self._fmu.instantiate()
        self._used = False
        self._simulate = fmpy.simulate_fmu
        self._fixed = self._fixed_start_values()
        self._restart = self._initial_start_values(model.initial_state(viability=viability))  # type: ignore[attr-defined]
        self._outputs = sorted(
            {s.fmu for s in self.variables.states + self.variables.rates}
            | set(self.variables.restart.values())
        )
        self._values = self._read_initial()

    # -- set-up --------------------------------------------------------------------------
    def _check_map(self, path: Path) -> None:
        for s in self.variables.states:
            unit = self._state_units.get(s.name)
            if unit is None:
                raise ConfigError(
                    f"{path} [states] {s.name}: not a state of the {self.plugin.name!r} model "
                    f"({', '.join(self._state_units)})."
                )
            if unit != s.unit:
                raise ConfigError(
                    f"{path} [states] {s.name}: unit {s.unit!r}, but the plug-in's is {unit!r}; "
                    "state the factor from the FMU's unit to the plug-in's."
                )
        for r in self.variables.rates:
            unit = self._rate_units.get(r.name)
            if unit != r.unit:
                raise ConfigError(
                    f"{path} [rates] {r.name}: unit {r.unit!r}, but the plug-in's rate is {unit!r}."
                    if unit
                    else f"{path} [rates] {r.name}: not a rate of the {self.plugin.name!r} "
                    f"model ({', '.join(self._rate_units)})."
                )
        missing = [n for n in self._input_names if n not in {i.name for i in self.variables.inputs}]
        for i in self.variables.inputs:
            unit = self._input_units.get(i.name)
            if unit != i.unit:
                raise ConfigError(
                    f"{path} [inputs] {i.name}: unit {i.unit!r}, but the plug-in's input is "
                    f"{unit!r}."
                    if unit
                    else f"{path} [inputs] {i.name}: not an input of "
                    f"the {self.plugin.name!r} model ({', '.join(self._input_units)})."
                )
        if missing:
            raise ConfigError(f"{path} [inputs]: the plug-in's input(s) {missing} are not mapped.")
        for kind, links, obj in (
            ("parameters", self.variables.parameters, self.parameters),
            ("process", self.variables.process_fields, self.process),
        ):
            for link in links:
                if not hasattr(obj, link.name):
                    raise ConfigError(
                        f"{path} [{kind}] {link.name}: not a field of the {self.plugin.name!r} "
                        f"{'kinetics' if kind == 'parameters' else 'process specification'}."
                    )
        mapped = {s.name for s in self.variables.states}
        spec = self.sensors
        derived = {"viability", "total_viable_cells"}
        unknown = sorted(n for n in (*spec.online, *spec.assays) if n not in mapped | derived)
        if unknown:
            raise ConfigError(
                f"{path}: the plug-in's sensors read {unknown}, which the map does not take "
                "from the FMU; map them under [states]."
            )

    def _fixed_start_values(self) -> dict[str, float]:
        """Kinetic parameters and process fields the FMU runs with."""
        out: dict[str, float] = {}
        for link in self.variables.parameters:
            out[link.fmu] = float(getattr(self.parameters, link.name)) / link.factor
        for link in self.variables.process_fields:
            out[link.fmu] = float(getattr(self.process, link.name)) / link.factor
        return out

    def _initial_start_values(self, initial: Mapping[str, float]) -> dict[str, float]:
        """Start parameters of the first interval from the plug-in's initial state."""
        fmu_value = {s.name: float(initial[s.name]) / s.factor for s in self.variables.states}
        out: dict[str, float] = {}
        for s in self.variables.states:
            if s.start is not None:
                scale = fmu_value[s.start_times] if s.start_times is not None else 1.0
                out[s.start] = fmu_value[s.name] * scale
        return out

    def _start_values(self) -> dict[str, float]:
        return {**self._fixed, **self._restart}

    def _read_initial(self) -> dict[str, float]:
        """The FMU's variables at inoculation (initialised, not integrated)."""
        fmu = self._fmu
        fmu.setupExperiment(startTime=self.time_h)
        values = self._start_values()
        values.update(self._input_table({n: self.bounds[n][0] for n in self._input_names}))
        fmu.setReal([self._refs[k] for k in values], list(values.values()))
        fmu.enterInitializationMode()
        fmu.exitInitializationMode()
        names = self._outputs
        read = dict(zip(names, fmu.getReal([self._refs[n] for n in names]), strict=True))
        fmu.terminate()
        self._used = True
        self._restart.update({p: float(read[v]) for p, v in self.variables.restart.items()})
        return {k: float(v) for k, v in read.items()}

    def _input_table(self, inputs: Mapping[str, float]) -> dict[str, float]:
        """Start values that hold each input constant (tables: all rows the same value)."""
        out: dict[str, float] = {}
        for link in self.variables.inputs:
            value = float(inputs[link.name]) / link.factor
            if link.variable is not None:
                out[link.variable] = value
                continue
            for row in range(1, link.rows + 1):
                # the first row at 0 h, the others after any culture age
                out[f"{link.table}[{row},1]"] = 0.0 if row == 1 else 1e6 + row
                out[f"{link.table}[{row},2]"] = value
        return out

    # -- the Plant protocol ----------------------------------------------------------------
    @property
    def plant_id(self) -> str:
        """The batch the plant stands for."""
        return self._plant_id

    @property
    def input_names(self) -> tuple[str, ...]:
        return self._input_names

    def variable_units(self) -> dict[str, str]:
        """Canonical unit of every mapped state and rate and of every input."""
        units = {s.name: s.unit for s in self.variables.states + self.variables.rates}
        units.update(self._input_units)
        return units

    def true_values(self) -> dict[str, float]:
        """The mapped FMU variables (plug-in names and units) with viability and total
        viable cells."""
        values = {s.name: s.factor * self._values[s.fmu] for s in self.variables.states}
        values.update(self.plugin.derived_values(values))
        return values

    def true_rates(self, inputs: Mapping[str, float]) -> dict[str, float]:
        """The kinetic rates the map's ``[rates]`` reads from the FMU now (under the inputs
        held over the last step, not ``inputs``); empty when it maps none."""
        return {r.name: r.factor * self._values[r.fmu] for r in self.variables.rates}

    def initial_measurements(self) -> list[Measurement]:
        """Online readings at inoculation (and the day-0 assay when it is due)."""
        return self.readings.initial(self.true_values(), self.time_h)

    def step(self, inputs: Mapping[str, float], dt_h: float) -> list[Measurement]:
        """Hold ``inputs`` (clamped to the bounds) for ``dt_h`` hours; the measurements that
        became available."""
        if not (dt_h > 0 and math.isfinite(dt_h)):
            raise ModelError(f"step length must be positive and finite, got {dt_h!r}")
        held, clamped = clamp_inputs(inputs, self.bounds)
        self.clamped_inputs += clamped

        def advance_to(t: float) -> dict[str, float]:
            if t > self.time_h + 1e-12:
                self._run(held, self.time_h, t)
            return self.true_values()

        return self.readings.interval(self.time_h, self.time_h + dt_h, advance_to)

    def _run(self, inputs: Mapping[str, float], t0: float, t1: float) -> None:
        """Simulate the FMU from ``t0`` to ``t1`` h from the last state, inputs held."""
        if self._used:
            self._fmu.reset()
        self._used = True
        start = self._start_values()
        start.update(self._input_table(inputs))
        try:
            result = self._simulate(
                self._unzipdir,
                validate=False,
                start_time=t0,
                stop_time=t1,
                relative_tolerance=self.relative_tolerance,
                output_interval=t1 - t0,
                start_values=start,
                output=self._outputs,
                model_description=self._md,
                fmu_instance=self._fmu,
            )
        except Exception as exc:  # fmpy raises plain Exceptions for solver and FMI errors
            raise IntegrationError(
                f"FMU {self.fmu_path.name}: simulation of [{t0:g}, {t1:g}] h failed ({exc})"
            ) from exc
        last = result[-1]
        values = {n: float(last[n]) for n in self._outputs}
        bad = [n for n, v in values.items() if not math.isfinite(v)]
        if bad:
            raise IntegrationError(
                f"FMU {self.fmu_path.name}: non-finite {bad} at {t1:g} h after [{t0:g}, {t1:g}] h"
            )
        self._values = values
        self._restart.update({p: values[v] for p, v in self.variables.restart.items()})
        self.time_h = t1

    def close(self) -> None:
        """Free the FMU instance and its extracted files (also done when garbage-collected)."""
        if self._fmu is not None:
            self._fmu.freeInstance()
            self._fmu = None
        self._cleanup()

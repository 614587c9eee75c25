"""Process plug-ins: everything that depends on which process runs, in one object.

A process (T-cell perfusion, CHO fed-batch, a site's own MSC or NK-cell process) is a
:class:`ProcessPlugin`. It owns the model class and its default parameter and process
files, the variables with units (the model's :class:`~plant_models.base.VariableSpec`), the
recipe (read from the process file's ``[recipe]`` table), the operator's feedback rule, the
default MPC tuning, the GP features and correctable rates, the adaptable patient
parameters, the sensors and assays, the hard limits, and the truth variants the simulator
runs. Nothing else in hmpc branches on a process name.

Plug-ins are found by name through the entry point group :data:`ENTRY_POINT_GROUP`; a
site's own package registers one in its ``pyproject.toml``::

    [project.entry-points."hmpc.processes"]
    msc = "my_site_process:PROCESS"

and ``get_process("msc")`` then returns it (docs/architecture.md walks through one).
Pure numerics and data: no I/O beyond reading the plug-in's own files.
"""

from __future__ import annotations

import abc
import dataclasses
import itertools
import math
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol

from plant_models.adaptation import AdaptedParameter
from plant_models.base import MechanisticModel
from plant_models.config import ParameterFile, check_keys, load_parameters, load_toml
from plant_models.errors import ConfigError

__all__ = [
    "DEFAULT_PROCESS",
    "ENTRY_POINT_GROUP",
    "EstimatorDefaults",
    "HardLimit",
    "PatientLike",
    "ProcessPlugin",
    "Recipe",
    "SensorDefaults",
    "SensorNoise",
    "available_processes",
    "get_process",
    "load_recipe",
    "process_of",
]

#: Entry point group under which process plug-ins register.
ENTRY_POINT_GROUP = "hmpc.processes"
#: The process a command runs when none is named.
DEFAULT_PROCESS = "tcell"

#: A recipe: per input, piecewise-constant (start culture age h, value) steps.
Recipe = Mapping[str, tuple[tuple[float, float], ...]]


@dataclasses.dataclass(frozen=True)
class SensorNoise:
    """Noise of one probe or assay: ``sd = absolute + relative * |value|``, in ``unit``."""

    unit: str
    absolute: float = 0.0
    relative: float = 0.0


@dataclasses.dataclass(frozen=True)
class EstimatorDefaults:
    """What the state estimator assumes of the process by default (the measurement noise
    is the plug-in's :class:`SensorDefaults`): plain data, read by
    ``controller.numerics.estimator.EstimatorConfig.for_model``.

    Attributes:
        process_noise: state -> (absolute, relative) model error per sqrt(h).
        physical_ranges: variable -> (low, high); values outside are not physical.
        parameter_factors: kinetic parameters with an estimated multiplicative factor
            (per-batch drift); they must be parameters of the plug-in's model.
        online_gains: online probes whose gain is estimated (observable only by assays).
    """

    process_noise: Mapping[str, tuple[float, float]] = dataclasses.field(default_factory=dict)
    physical_ranges: Mapping[str, tuple[float, float]] = dataclasses.field(default_factory=dict)
    parameter_factors: tuple[str, ...] = ()
    online_gains: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class SensorDefaults:
    """The process's typical online probes and offline assays (the simulator's defaults)."""

    online: Mapping[str, SensorNoise]
    assays: Mapping[str, SensorNoise]
    assay_interval: float = 24.0
    assay_delay: float = 4.0


@dataclasses.dataclass(frozen=True)
class HardLimit:
    """A hard process limit: ``variable`` must stay on the right side of the process
    specification's field ``field``; ``name`` labels a violation (e.g. ``glucose_low``)."""

    name: str
    variable: str
    side: Literal["low", "high"]
    field: str

    def value(self, process: Any) -> float:
        return float(getattr(process, self.field))

    def violated(self, process: Any, values: Mapping[str, float]) -> bool:
        limit = self.value(process)
        v = float(values[self.variable])
        return v < limit if self.side == "low" else v > limit


class PatientLike(Protocol):
    """What a truth model needs of a (virtual) patient."""

    @property
    def growth_factor(self) -> float: ...

    @property
    def lag_time(self) -> float: ...

    @property
    def exhaustion_factor(self) -> float: ...

    @property
    def initial_viability(self) -> float: ...


class ProcessPlugin(abc.ABC):
    """Base class of a process plug-in. Subclasses set the class attributes and implement
    :meth:`load_parameters`, :meth:`load_process`, :meth:`model`, :meth:`rule` and
    :meth:`media_litres`; the rest has working defaults.

    Attributes:
        name: registry name (also ``[meta] model`` of its parameter files).
        title: one line for listings.
        default_mpc_config: the packaged MPC tuning: a file name in hmpc's configs folder,
            or an absolute path (a site plug-in ships its own).
        gp_features: default features of the GP residual.
        correctable_rates: the model rates a residual may correct.
        simulated_states: states the patient-parameter fit simulates (cells and what
            integrates them).
        sensors: the typical probes and assays.
        hard_limits: the process specification's hard limits on the states.
        rate_limited_inputs: input -> process field with its maximum change per hour.
        soft_limits: limit name -> process field, for plots and reports.
        dose_field: process field of the patient dose (1e9 viable cells), if any.
        truth_variants: name -> truth parameter file the simulator can run.
        feed_composition: process fields that say what the inputs add (feed and media
            concentrations); batch records are checked against them
            (``controller.training.check_records_fit_process``).
    """

    name: str = ""
    title: str = ""
    default_mpc_config: str = ""
    gp_features: ClassVar[tuple[str, ...]] = ()
    correctable_rates: ClassVar[tuple[str, ...]] = ("growth_rate",)
    simulated_states: ClassVar[tuple[str, ...]] = ("viable_cells",)
    sensors: ClassVar[SensorDefaults] = SensorDefaults({}, {})
    estimator: ClassVar[EstimatorDefaults] = EstimatorDefaults()
    hard_limits: ClassVar[tuple[HardLimit, ...]] = ()
    rate_limited_inputs: ClassVar[Mapping[str, str]] = {}
    soft_limits: ClassVar[Mapping[str, str]] = {}
    dose_field: str | None = None
    truth_variants: ClassVar[Mapping[str, Path]] = {}
    feed_composition: ClassVar[tuple[str, ...]] = ()

    #: the model class, called as ``model_type(parameters, process)``
    model_type: ClassVar[type[MechanisticModel[Any]] | None] = None
    #: the frozen dataclasses of the kinetics and of the process specification
    parameters_type: ClassVar[type | None] = None
    process_type: ClassVar[type | None] = None
    #: the packaged parameter and process files
    parameters_path: ClassVar[Path | None] = None
    process_path: ClassVar[Path | None] = None

    # -- files and models ------------------------------------------------------------
    def load_parameters(self, path: str | Path | None = None) -> tuple[Any, ParameterFile]:
        """The controller model's kinetics (default: the packaged nominal file), a
        ``[meta] model = <name>`` parameter file of :attr:`parameters_type`."""
        return load_parameters(
            self._declared("parameters_type"),
            path if path is not None else self._declared("parameters_path"),
            model=self.name,
        )

    def load_process(self, path: str | Path | None = None) -> tuple[Any, ParameterFile]:
        """The process specification (default: the packaged process file), a
        ``[meta] model = <name>-process`` file of :attr:`process_type`."""
        return load_parameters(
            self._declared("process_type"), self.process_file(path), model=f"{self.name}-process"
        )

    def process_file(self, path: str | Path | None = None) -> Path:
        """The process file a path names (default: the packaged one)."""
        return Path(path) if path is not None else Path(self._declared("process_path"))

    def model(self, parameters: Any, process: Any) -> MechanisticModel[Any]:
        """The mechanistic model of given kinetics and process specification."""
        return self._declared("model_type")(parameters, process)

    def _declared(self, attribute: str) -> Any:
        value = getattr(self, attribute)
        if value is None:
            raise ConfigError(
                f"process plug-in {self.name!r} ({type(self).__name__}) declares no {attribute}; "
                "set it on the class or override the method that uses it."
            )
        return value

    @abc.abstractmethod
    def rule(
        self, values: Mapping[str, float], time_h: float, settings: Any = None
    ) -> dict[str, float]:
        """The operator's feedback rule: next inputs from the latest measured ``values``
        with the rule's ``settings`` (default: :meth:`rule_settings`)."""

    def rule_settings(self) -> Any:
        """The default settings of :meth:`rule` (a frozen dataclass, or None)."""
        return None

    @abc.abstractmethod
    def media_litres(
        self, inputs: Mapping[str, float], values: Mapping[str, float], step_h: float
    ) -> float:
        """Fresh media and feed used over one step of ``step_h`` hours, L."""

    # -- defaults built on the above ---------------------------------------------------
    def build_model(
        self, parameters: str | Path | None = None, process: str | Path | None = None
    ) -> MechanisticModel[Any]:
        """The controller's nominal model from parameter and process files."""
        return self.model(self.load_parameters(parameters)[0], self.load_process(process)[0])

    def load_truth_parameters(self, path: str | Path | None = None) -> tuple[Any, ParameterFile]:
        """Truth-plant kinetics (default: the first truth variant, else the nominal file)."""
        if path is None and self.truth_variants:
            path = next(iter(self.truth_variants.values()))
        return self.load_parameters(path)

    def truth_model(
        self, patient: PatientLike, process: Any, truth: Any = None
    ) -> MechanisticModel[Any]:
        """The truth plant of one patient: by default the model on the truth kinetics with
        the patient's growth factor applied to ``mu_max``."""
        base = truth if truth is not None else self.load_truth_parameters()[0]
        return self.model(
            dataclasses.replace(base, mu_max=base.mu_max * patient.growth_factor), process
        )

    def adapted_parameters(self) -> tuple[AdaptedParameter, ...]:
        """Patient parameters the MPC may fit to the running batch (default: none)."""
        return ()

    def recipe(self, process_file: str | Path | None = None) -> Recipe:
        """The recipe of a process file's ``[recipe]`` table (:func:`load_recipe`)."""
        path = self.process_file(process_file)
        model = self.model(self.load_parameters()[0], self.load_process(path)[0])
        return load_recipe(path, model)

    def derived_values(self, values: Mapping[str, float]) -> dict[str, float]:
        """Viability and total viable cells (1e9 cells) from the states."""
        viable = float(values["viable_cells"])
        total = viable + float(values.get("dead_cells", 0.0))
        viability = viable / total if total > 0 else 0.0
        # 1e6 cells/mL x L = 1e9 cells (and 1e9 cells/L x L = 1e9 cells)
        return {"viability": viability, "total_viable_cells": viable * float(values["volume"])}

    def rate_limits(self, process: Any) -> dict[str, float]:
        """Maximum change per hour of the rate-limited inputs."""
        return {k: float(getattr(process, f)) for k, f in self.rate_limited_inputs.items()}

    def violations(self, process: Any, values: Mapping[str, float]) -> list[str]:
        """Names of the hard limits the state ``values`` violate."""
        return [h.name for h in self.hard_limits if h.violated(process, values)]

    def soft_limit_values(self, process: Any) -> list[tuple[str, str, float]]:
        """(variable, side, value) of every soft limit; a soft limit's name is
        ``<variable>_<low|high>``."""
        out = []
        for name, field in self.soft_limits.items():
            variable, side = name.rsplit("_", 1)
            out.append((variable, side, float(getattr(process, field))))
        return out

    def limit_values(self, process: Any) -> dict[str, float]:
        """Hard and soft limit values by process field (for reports and plots)."""
        fields = [h.field for h in self.hard_limits] + list(self.soft_limits.values())
        return {f: float(getattr(process, f)) for f in dict.fromkeys(fields)}

    def dose_cells(self, process: Any) -> float | None:
        """The patient dose (1e9 viable cells), or None for a process without one."""
        return None if self.dose_field is None else float(getattr(process, self.dose_field))


# -- recipes ------------------------------------------------------------------------------


def load_recipe(path: str | Path, model: MechanisticModel[Any]) -> Recipe:
    """Read the ``[recipe]`` table of a process file.

    Each input is ``name = { unit = "...", steps = [[start_h, value], ...] }``: the value
    from each start (culture age, h) on; starts increase from 0; the unit must be the
    input's canonical unit; values lie within the model's operating bounds. An input the
    table does not name is held at its lower bound.

    Raises:
        ConfigError: naming the file, the input and what is allowed.
    """
    p = Path(path)
    table = load_toml(p).get("recipe")
    where = f"{p} [recipe]"
    if not isinstance(table, dict):
        raise ConfigError(
            f"{where}: missing; a process file states its recipe as "
            "[recipe] input = { unit = ..., steps = [[start_h, value], ...] }."
        )
    specs = {s.name: s for s in model.inputs}
    bounds: dict[str, tuple[float, float]] = model.operating_bounds()  # type: ignore[attr-defined]
    check_keys(table, specs, where)
    out: dict[str, tuple[tuple[float, float], ...]] = {}
    for name in specs:
        if name not in table:
            out[name] = ((0.0, float(bounds[name][0])),)
            continue
        entry = table[name]
        w = f"{where} {name}"
        if not isinstance(entry, dict):
            raise ConfigError(f"{w}: expected {{ unit = ..., steps = [[start_h, value], ...] }}.")
        check_keys(entry, ["unit", "steps"], w, required=["unit", "steps"])
        if entry["unit"] != specs[name].unit:
            raise ConfigError(
                f"{w}: unit {entry['unit']!r} given, but this input is in "
                f"{specs[name].unit!r}; convert the values (units are never converted silently)."
            )
        out[name] = _steps(entry["steps"], bounds[name], w)
    return out


def _steps(raw: Any, bounds: tuple[float, float], where: str) -> tuple[tuple[float, float], ...]:
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{where}: steps must be a non-empty list of [start_h, value] pairs.")
    rows: list[tuple[float, float]] = []
    for row in raw:
        ok = isinstance(row, list) and len(row) == 2
        if ok and all(isinstance(v, int | float) and not isinstance(v, bool) for v in row):
            rows.append((float(row[0]), float(row[1])))
        else:
            raise ConfigError(f"{where}: step {row!r} is not a [start_h, value] pair of numbers.")
    starts = [r[0] for r in rows]
    if starts[0] != 0.0 or any(b <= a for a, b in itertools.pairwise(starts)):
        raise ConfigError(f"{where}: step starts {starts} must begin at 0 h and increase.")
    low, high = bounds
    for start, value in rows:
        if not (math.isfinite(value) and low <= value <= high):
            raise ConfigError(
                f"{where}: value {value!r} at {start:g} h is outside the input's bounds "
                f"[{low:g}, {high:g}] of the process specification."
            )
    return tuple(rows)


def schedule_value(steps: Sequence[tuple[float, float]], time_h: float) -> float:
    """The value of piecewise-constant (start_h, value) steps at ``time_h``."""
    value = steps[0][1]
    for start, v in steps:
        if time_h >= start:
            value = v
    return value


# -- registry -----------------------------------------------------------------------------


def _entry_points() -> dict[str, metadata.EntryPoint]:
    return {ep.name: ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}


def available_processes() -> tuple[str, ...]:
    """Names of the registered process plug-ins, sorted."""
    return tuple(sorted(_entry_points()))


_LOADED: dict[str, ProcessPlugin] = {}


def get_process(name: str | ProcessPlugin) -> ProcessPlugin:
    """The registered process plug-in of a name (a plug-in is returned as it is).

    Raises:
        ConfigError: no plug-in of that name (the message lists the registered ones), or
            the entry point does not name a :class:`ProcessPlugin`.
    """
    if isinstance(name, ProcessPlugin):
        return name
    if name in _LOADED:
        return _LOADED[name]
    eps = _entry_points()
    if name not in eps:
        from plant_models.config import suggest

        raise ConfigError(
            f"process {name!r} is not registered; registered: {', '.join(sorted(eps)) or 'none'}."
            f"{suggest(name, eps)} A process plug-in registers under the entry point group "
            f"{ENTRY_POINT_GROUP!r} (docs/architecture.md); is its package installed?"
        )
    plugin = eps[name].load()
    if isinstance(plugin, type) and issubclass(plugin, ProcessPlugin):
        try:
            plugin = plugin()
        except TypeError as exc:  # an abstract member left out
            raise ConfigError(f"process plug-in {name!r} is incomplete: {exc}") from None
    if not isinstance(plugin, ProcessPlugin) or plugin.name != name:
        raise ConfigError(
            f"entry point {eps[name].value!r} ({ENTRY_POINT_GROUP}: {name}) must name a "
            f"ProcessPlugin whose name is {name!r}."
        )
    _LOADED[name] = plugin
    return plugin


def process_of(model: Any) -> ProcessPlugin | None:
    """The registered plug-in whose model class ``model`` is (a hybrid model is unwrapped to
    its mechanistic ``base``; a subclass, e.g. a truth model, matches its parent's plug-in);
    None for a model no plug-in declares (or whose plug-in cannot be loaded)."""
    while getattr(model, "base", None) is not None:
        model = model.base
    matches: list[ProcessPlugin] = []
    for name in available_processes():
        try:
            plugin = get_process(name)
        except ConfigError:
            continue
        kind = plugin.model_type
        if kind is not None and isinstance(model, kind):
            if type(model) is kind:
                return plugin
            matches.append(plugin)
    return matches[0] if len(matches) == 1 else None

"""The site file: where the plant is, how to talk to it securely, which node carries which
model variable in which device unit, and which controller runs each bioreactor.

A site file (TOML, e.g. ``configs/site_sim.toml``)::

    [site]
    name = "simulated plant on loopback"

    [endpoints]
    bioreactor = "opc.tcp://127.0.0.1:4840/hmpc/bioreactor"

    [security]
    policy = "Basic256Sha256"          # or Aes128_Sha256_RsaOaep, Aes256_Sha256_RsaPss
    mode = "SignAndEncrypt"            # or Sign
    certificate = "../pki/trusted/hmpc-controller_cert.der"
    private_key = "../pki/client/hmpc-controller_key.pem"
    application_uri = "urn:hmpc:controller"
    create_certificate = true          # generate a self-signed one on first run
    trusted_servers = "../pki/own"     # folder of server certificates we trust
    user = "apc"
    password_env = "HMPC_APC_PASSWORD" # or password_file = "..."

    [timing]
    period_h = 1.0                     # control period, process hours
    max_input_age_h = 1.5              # online inputs older than this are stale

    [clock]                            # the plant's process clock
    process_time = "nsu=urn:hmpc:sim;s=APC.Clock.ProcessTime"
    batch_start = "nsu=urn:hmpc:sim;s=APC.Clock.BatchStartTime"
    speed = "nsu=urn:hmpc:sim;s=APC.Clock.Speed"

    [apc]                              # the APC interface object of each unit
    object = "nsu=urn:hmpc:sim;s=APC.{unit}"

    [tags.glucose]                     # inputs: model variable <- node, device unit
    node = "nsu=urn:hmpc:sim;s={unit}.Bioreactor.FunctionSet.GlucoseSensor.SensorValue"
    unit = "mM"
    [tags.il2_assay]
    variable = "il2"
    source = "assay"
    node = "nsu=urn:hmpc:sim;s={unit}.Bioreactor.FunctionSet.IL2Assay.SensorValue"
    unit = "IU/mL"

    [setpoints.perfusion_rate]         # outputs: model input -> bundle item, device unit
    unit = "1/d"
    fallback = 0.5                     # the plant's safe value on shed (canonical unit);
                                       # checked against the plant at engagement

    [units.BR01]                       # one control task per bioreactor
    model = 'tcell'                    # a process plug-in (plant_models.process)
    controller = "rule"
    harvest_time_h = 192.0

Node ids name their namespace by URI (``nsu=URI;s=...``; ``i=N`` for namespace 0), never by
index; ``{unit}`` is replaced by the unit's name. ``[units.X.tags]`` and
``[units.X.setpoints]`` override the shared tables per unit. Relative paths are relative to
the site file's folder. Device values are converted to the model's canonical units at this
boundary only: by a known unit pair (table :data:`CONVERSIONS`, molar masses for g/L) or by
an explicit ``scale``/``offset`` (``canonical = scale * device + offset``).

Every problem is a :class:`~plant_models.errors.ConfigError` naming the file and the key,
with close matches for misspelled keys.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import stat
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

from controller.laws.printer import PrintPolicyConfig
from controller.numerics.units import (  # the one conversion table, re-exported here
    CONVERSIONS,
    MOLAR_MASSES,
    UnitConversion,
    conversion_for,
)
from plant_models.config import check_keys, load_fields, load_toml, setting, suggest
from plant_models.errors import ConfigError
from plant_models.process import available_processes, get_process

__all__ = [
    "CONTROLLER_KINDS",
    "CONVERSIONS",
    "MOLAR_MASSES",
    "ClockConfig",
    "InputTag",
    "NodeRef",
    "PrinterSiteConfig",
    "SecurityConfig",
    "SetpointTag",
    "SiteConfig",
    "TimingConfig",
    "UnitConfig",
    "UnitConversion",
    "canonical_units",
    "check_printer_settings",
    "conversion_for",
    "load_site",
    "parse_node_ref",
    "printer_forecast_overrides",
    "printer_policy_config",
]

#: Control laws a unit can run (built by controller.laws.control).
CONTROLLER_KINDS = ("recipe", "rule", "mechanistic-mpc", "hybrid-mpc")
POLICIES = ("Basic256Sha256", "Aes128_Sha256_RsaOaep", "Aes256_Sha256_RsaPss", "None")
MODES = ("Sign", "SignAndEncrypt")
SOURCES = ("online", "assay")

_NODE_RE = re.compile(r"^nsu=(?P<uri>[^;]+);(?P<kind>[sig])=(?P<id>.+)$")
_NS0_RE = re.compile(r"^(?:ns=0;)?i=(?P<id>\d+)$")


@dataclasses.dataclass(frozen=True)
class NodeRef:
    """A node id whose namespace is named by URI (resolved to an index on every connection).

    Attributes:
        uri: namespace URI (``""``: namespace 0).
        kind: ``s`` (string), ``i`` (numeric) or ``g`` (GUID) identifier.
        identifier: the identifier text.
    """

    uri: str
    kind: str
    identifier: str

    def __str__(self) -> str:
        if not self.uri:
            return f"i={self.identifier}"
        return f"nsu={self.uri};{self.kind}={self.identifier}"

    def child(self, name: str) -> NodeRef:
        """The string node id ``<identifier>.<name>`` in the same namespace."""
        return NodeRef(self.uri, self.kind, f"{self.identifier}.{name}")


def parse_node_ref(text: str, where: str, *, unit: str | None = None) -> NodeRef:
    """Parse ``nsu=URI;s=ID`` (or ``i=N`` in namespace 0), replacing ``{unit}``."""
    if not isinstance(text, str):
        raise ConfigError(f"{where}: a node id must be a string such as 'nsu=URI;s=Name'.")
    value = text.replace("{unit}", unit) if unit is not None else text
    if "{" in value or "}" in value:
        raise ConfigError(f"{where}: unknown placeholder in {text!r}; only {{unit}} is replaced.")
    m = _NODE_RE.match(value)
    if m is not None:
        return NodeRef(m["uri"], m["kind"], m["id"])
    m = _NS0_RE.match(value)
    if m is not None:
        return NodeRef("", "i", m["id"])
    hint = ""
    if value.startswith("ns="):
        hint = " Namespace indexes change between servers and restarts: name it by URI (nsu=)."
    raise ConfigError(
        f"{where}: {text!r} is not a node id of the form 'nsu=URI;s=Name' "
        f"(or 'i=N' in namespace 0).{hint}"
    )


def canonical_units(model: str) -> dict[str, str]:
    """Canonical unit of every variable of a process (states, inputs, viability)."""
    m = get_process(model).build_model()
    units = {v.name: v.unit for v in list(m.states) + list(m.inputs)}
    units["viability"] = "1"
    return units


def input_names(model: str) -> tuple[str, ...]:
    """The inputs of a process's model, in order."""
    return get_process(model).build_model().input_names


# -- settings ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SecurityConfig:
    """How the controller authenticates itself and the server.

    Attributes:
        policy: security policy (``None`` only with ``allow_insecure``).
        mode: ``Sign`` or ``SignAndEncrypt``.
        certificate, private_key: the controller's application certificate (DER or PEM)
            and key (PEM).
        application_uri: must equal the certificate's URI SAN.
        create_certificate: generate a self-signed certificate when the files are missing.
        trusted_servers: folder of trusted server certificates (None: trust the certificate
            the server presents, logged as a warning; development only).
        user: user name (the server's ``apc`` role).
        password_env / password_file: where the password comes from (never the site file).
        allow_insecure: permit ``policy = "None"`` (development).
    """

    policy: str
    mode: str
    certificate: Path
    private_key: Path
    application_uri: str
    user: str
    password_env: str | None = None
    password_file: Path | None = None
    create_certificate: bool = False
    trusted_servers: Path | None = None
    allow_insecure: bool = False
    source: str = ""

    def password(self) -> str:
        """The user's password, read now (so a rotated secret takes effect on reconnect)."""
        if self.password_env is not None:
            value = os.environ.get(self.password_env)
            if not value:
                raise ConfigError(
                    f"{self.source} [security] password_env: environment variable "
                    f"{self.password_env} is not set; export the password of user "
                    f"{self.user!r} in it."
                )
            return value
        if self.password_file is not None:
            self._check_password_file()
            try:
                return self.password_file.read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as exc:
                why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
                raise ConfigError(
                    f"{self.source} [security] password_file: cannot read "
                    f"{self.password_file} ({why})."
                ) from None
        raise ConfigError(f"{self.source} [security]: give password_env or password_file.")

    def _check_password_file(self) -> None:
        """Refuse a password file that others than its owner may read (as ssh does with a
        private key): the secret would not be a secret."""
        if self.password_file is None:
            return
        w = f"{self.source} [security] password_file {self.password_file}"
        try:
            mode = self.password_file.stat().st_mode
        except OSError as exc:
            raise ConfigError(f"{w}: cannot be read ({exc.strerror}).") from None
        if not stat.S_ISREG(mode):
            raise ConfigError(f"{w}: not a regular file.")
        if mode & 0o077:
            raise ConfigError(
                f"{w}: readable or writable by group or others (mode {stat.S_IMODE(mode):04o}); "
                f"restrict it with: chmod 600 {self.password_file}"
            )

    def check_files(self) -> None:
        """Check, before anything connects, the files the security settings name: the
        trust folder exists (a missing one would only show at connect, retried forever)
        and the password file is private. The certificate and key are checked (or
        created) at connect.

        Raises:
            ConfigError: naming the key, the path and the fix.
        """
        if self.trusted_servers is not None and not self.trusted_servers.is_dir():
            raise ConfigError(
                f"{self.source} [security] trusted_servers: folder {self.trusted_servers} does "
                "not exist; create it and copy the plant server's certificate into it (or "
                "remove the key to trust any server, development only)."
            )
        self._check_password_file()
        if self.password_env is not None:
            self.password()  # an unset variable fails now, not at the first connect


@dataclasses.dataclass(frozen=True)
class TimingConfig:
    """Timing of the loop.

    Attributes:
        period_h: control period, process hours (cycles at multiples of it).
        max_input_age_h: an online input older than this (process time) is stale.
        solve_budget_s: wall seconds a control-law step may take before it is abandoned
            (None: half the period in wall seconds at the plant's clock speed).
        heartbeat_interval_s: wall seconds between heartbeats (well below the plant's
            watchdog time-out).
        request_timeout_s: time-out of one OPC UA request, s.
        reconnect_interval_s: first wait before reconnecting (doubles up to 30 s).
        publishing_interval_ms: subscription publishing interval.
        engage_ramp_h: after (re-)engagement, each setpoint moves at most its span divided
            by this per process hour (0: only the rate limits).
    """

    period_h: float = setting(1.0, low=0.0, high=48.0, low_open=True, unit="h")
    max_input_age_h: float = setting(1.5, low=0.0, high=1e4, low_open=True, unit="h")
    solve_budget_s: float | None = setting(None, low=0.0, high=86400.0, low_open=True, unit="s")
    heartbeat_interval_s: float = setting(1.0, low=0.0, high=600.0, low_open=True, unit="s")
    request_timeout_s: float = setting(5.0, low=0.0, high=600.0, low_open=True, unit="s")
    reconnect_interval_s: float = setting(1.0, low=0.0, high=600.0, low_open=True, unit="s")
    publishing_interval_ms: float = setting(50.0, low=0.0, high=60000.0, low_open=True, unit="ms")
    engage_ramp_h: float = setting(0.0, low=0.0, high=1000.0, unit="h")


@dataclasses.dataclass(frozen=True)
class ClockConfig:
    """Nodes of the plant's process clock (culture age, batch start, speed)."""

    process_time: NodeRef
    batch_start: NodeRef
    speed: NodeRef | None = None


@dataclasses.dataclass(frozen=True)
class InputTag:
    """One measured input: node -> model variable in canonical units.

    Attributes:
        key: the tag's name in the site file.
        variable: model variable (e.g. ``glucose``).
        node: the node id.
        conversion: device -> canonical unit.
        source: ``online`` (freshness-checked) or ``assay`` (sample time = SourceTimestamp).
        required: a stale or bad value blocks the move (default: online inputs).
        max_age_h: freshness limit (default: the site's ``max_input_age_h``; assays: none).
    """

    key: str
    variable: str
    node: NodeRef
    conversion: UnitConversion
    source: str = "online"
    required: bool = True
    max_age_h: float | None = None


@dataclasses.dataclass(frozen=True)
class SetpointTag:
    """One manipulated variable: model input -> bundle item in device units, with the
    controller-side limits (canonical units; missing: the plant's advertised limits).

    ``fallback`` is the safe value the plant is declared to apply when it sheds the
    controller (its watchdog): the controller checks the plant's published fallback against
    it at every engagement (refusing to engage on a mismatch) and moves there itself when
    its control law fails (None: none declared; the plant's fallback is only recorded).
    """

    variable: str
    item: str
    conversion: UnitConversion
    low: float | None = None
    high: float | None = None
    rate: float | None = None
    deadband: float | None = None
    fallback: float | None = None


@dataclasses.dataclass(frozen=True)
class UnitConfig:
    """One bioreactor and its controller.

    Attributes:
        name: unit name (``{unit}`` in node templates).
        endpoint: key of ``[endpoints]`` its server is at.
        model: ``tcell`` or ``cho``.
        controller: control law (:data:`CONTROLLER_KINDS`).
        mpc_config, residual: MPC tuning (default: the packaged ``configs/mpc_<model>.toml``)
            and GP residual files (MPC controllers).
        batch_id: batch identifier (None: read from the APC interface's ``BatchId``).
        harvest_time_h: the loop ends at this culture age (None: never).
        apc: the unit's APC interface object.
        inputs, setpoints: tag map.
    """

    name: str
    endpoint: str
    model: str
    controller: str
    apc: NodeRef
    inputs: tuple[InputTag, ...]
    setpoints: tuple[SetpointTag, ...]
    mpc_config: Path | None = None
    residual: Path | None = None
    batch_id: str | None = None
    harvest_time_h: float | None = None


@dataclasses.dataclass(frozen=True)
class PrinterSiteConfig:
    """The ``[printer]`` table: the co-located printer (``controller.runtime.printing``;
    docs/printer.md).

    Attributes:
        endpoint: the printer's OPC UA server (same ``[security]`` as the plant I/O).
        object: the printer object (its namespace URI is where the job nodes live).
        settings: the print-job policy's settings
            (``controller.laws.printer.PrintPolicyConfig``; :func:`printer_policy_config`).
        forecast: harvest-forecast settings (``controller.numerics.forecast.ForecastConfig``
            scalars; noise defaults to the estimator's; :func:`printer_forecast_overrides`).
        patient_id: node of the batch's patient id on the bioreactor server (``{unit}``
            replaced; None: the batch id is used).
        finish_within_h: after the harvest, follow the print job for at most this many
            process hours.
    """

    endpoint: str
    object: NodeRef | None = None
    settings: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    forecast: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    patient_id: str | None = None
    finish_within_h: float = 24.0


@dataclasses.dataclass(frozen=True)
class SiteConfig:
    """A validated site file."""

    path: Path
    name: str
    endpoints: Mapping[str, str]
    security: SecurityConfig
    timing: TimingConfig
    clock: ClockConfig
    units: tuple[UnitConfig, ...]
    printer: PrinterSiteConfig | None = None
    output_dir: Path | None = None

    def unit(self, name: str) -> UnitConfig:
        for u in self.units:
            if u.name == name:
                return u
        raise ConfigError(
            f"{self.path}: no unit {name!r}.{suggest(name, [u.name for u in self.units])}"
        )


# -- loading -------------------------------------------------------------------------------------
TOP = (
    "site",
    "endpoints",
    "security",
    "timing",
    "clock",
    "apc",
    "tags",
    "setpoints",
    "units",
    "printer",
)


def _table(data: Mapping[str, Any], key: str, where: str, *, required: bool = False) -> Any:
    value = data.get(key)
    if value is None:
        if required:
            raise ConfigError(f"{where}: missing required table [{key}].")
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: {key} must be a table, got {type(value).__name__}.")
    return value


#: The longest string value a site file may give (names, node ids, paths, URIs).
MAX_STRING = 512


def _str(t: Mapping[str, Any], key: str, where: str, default: str | None = None) -> str:
    value = t.get(key, default)
    if value is None:
        raise ConfigError(f"{where}: missing required key {key!r}.")
    if not isinstance(value, str) or not value:
        shown = repr(value) if len(repr(value)) <= 80 else f"{type(value).__name__} value"
        raise ConfigError(f"{where} {key} must be a non-empty string, got {shown}.")
    if len(value) > MAX_STRING:
        raise ConfigError(
            f"{where} {key}: {len(value)} characters, longer than {MAX_STRING} "
            f"(starts {value[:40]!r})."
        )
    if any(ord(c) < 32 and c not in "\t" for c in value):
        raise ConfigError(f"{where} {key}: contains control characters (starts {value[:40]!r}).")
    return value


def _opt_str(t: Mapping[str, Any], key: str, where: str) -> str | None:
    return _str(t, key, where) if key in t else None


def _num(
    t: Mapping[str, Any],
    key: str,
    where: str,
    default: float | None,
    low: float,
    high: float,
    unit: str,
    *,
    low_open: bool = False,
) -> float | None:
    value = t.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{where} {key} must be a number ({unit}), got {value!r}.")
    v = float(value)
    ok = (v > low if low_open else v >= low) and v <= high and math.isfinite(v)
    if not ok:
        bracket = "(" if low_open else "["
        raise ConfigError(
            f"{where} {key} = {value!r} {unit} is outside {bracket}{low:g}, {high:g}] {unit}."
        )
    return v


def _req_num(
    t: Mapping[str, Any],
    key: str,
    where: str,
    default: float,
    low: float,
    high: float,
    unit: str,
    *,
    low_open: bool = False,
) -> float:
    value = _num(t, key, where, default, low, high, unit, low_open=low_open)
    if value is None:  # unreachable with a default; keeps the type exact
        raise ConfigError(f"{where}: missing {key!r}.")
    return value


def _bool(t: Mapping[str, Any], key: str, where: str, default: bool) -> bool:
    value = t.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"{where} {key} must be true or false, got {value!r}.")
    return value


def _choice(t: Mapping[str, Any], key: str, where: str, default: str | None, allowed: Any) -> str:
    value = _str(t, key, where, default)
    if value not in allowed:
        raise ConfigError(
            f"{where} {key} = {value!r} is not allowed.{suggest(value, allowed)} "
            f"Choose one of: {', '.join(allowed)}."
        )
    return value


def _path(base: Path, t: Mapping[str, Any], key: str, where: str) -> Path | None:
    if key not in t:
        return None
    p = Path(_str(t, key, where)).expanduser()
    return p if p.is_absolute() else Path(os.path.normpath(base / p))


def _endpoint(text: Any, where: str) -> str:
    if not isinstance(text, str) or not text.startswith("opc.tcp://"):
        raise ConfigError(
            f"{where} must be an endpoint URL 'opc.tcp://host:port/path', got {text!r}."
        )
    return text


def load_site(path: str | Path) -> SiteConfig:
    """Load and validate a site file (see the module docstring for its layout).

    Raises:
        ConfigError: unknown or missing table or key (with close matches), bad value, unit
        without a conversion, node id without a namespace URI; the message names the file
        and key.
    """
    p = Path(path)
    data = load_toml(p)
    src = str(p)
    base = p.resolve().parent
    check_keys(data, TOP, src, required=["endpoints", "security", "clock", "apc", "tags", "units"])

    site = _table(data, "site", src)
    check_keys(site, ["name", "output_dir", "description"], f"{src} [site]")
    name = _str(site, "name", f"{src} [site]", p.stem)
    output_dir = _path(base, site, "output_dir", f"{src} [site]")

    eps = _table(data, "endpoints", src, required=True)
    if not eps:
        raise ConfigError(
            f"{src} [endpoints]: name at least one server, e.g. bioreactor = 'opc.tcp://...'."
        )
    endpoints = {k: _endpoint(v, f"{src} [endpoints] {k}") for k, v in eps.items()}

    security = _security(_table(data, "security", src, required=True), base, src)
    timing = _timing(_table(data, "timing", src), src)
    clock = _clock(_table(data, "clock", src, required=True), src)

    apc = _table(data, "apc", src, required=True)
    check_keys(apc, ["object"], f"{src} [apc]", required=["object"])
    apc_template = _str(apc, "object", f"{src} [apc]")
    parse_node_ref(apc_template, f"{src} [apc] object", unit="X")

    shared_tags = _table(data, "tags", src, required=True)
    shared_sps = _table(data, "setpoints", src)

    units_t = _table(data, "units", src, required=True)
    if not units_t:
        raise ConfigError(f"{src} [units]: add at least one bioreactor, e.g. [units.BR01].")
    units = tuple(
        _unit(
            uname,
            _table(units_t, uname, f"{src} [units]"),
            shared_tags,
            shared_sps,
            apc_template,
            endpoints,
            timing,
            base,
            src,
        )
        for uname in units_t
    )

    printer = None
    pr = _table(data, "printer", src)
    if pr:
        w = f"{src} [printer]"
        check_keys(
            pr,
            ["endpoint", "object", "settings", "forecast", "patient_id", "finish_within_h"],
            w,
            required=["endpoint"],
        )
        patient = _opt_str(pr, "patient_id", w)
        if patient is not None:
            parse_node_ref(patient, f"{w} patient_id", unit="X")
        printer = PrinterSiteConfig(
            endpoint=_endpoint(pr["endpoint"], f"{w} endpoint"),
            object=parse_node_ref(pr["object"], f"{w} object") if "object" in pr else None,
            settings=MappingProxyType(dict(_table(pr, "settings", w))),
            forecast=MappingProxyType(dict(_table(pr, "forecast", w))),
            patient_id=patient,
            finish_within_h=_req_num(pr, "finish_within_h", w, 24.0, 0.0, 1e4, "h", low_open=True),
        )
        check_printer_settings(printer, w)  # the tables' keys and values, at load time
    return SiteConfig(
        path=p,
        name=name,
        endpoints=MappingProxyType(endpoints),
        security=security,
        timing=timing,
        clock=clock,
        units=units,
        printer=printer,
        output_dir=output_dir,
    )


def printer_policy_config(printer: PrinterSiteConfig, where: str) -> PrintPolicyConfig:
    """The print-job policy's settings from ``[printer.settings]`` (the namespace of the job
    nodes defaults to the ``object``'s).

    Raises:
        ConfigError: unknown key (with close matches), wrong type, value out of range.
    """
    uri = printer.object.uri if printer.object is not None else None
    return PrintPolicyConfig.from_table(
        dict(printer.settings), f"{where} settings", namespace_uri=uri
    )


def printer_forecast_overrides(printer: PrinterSiteConfig, where: str) -> dict[str, Any]:
    """The ``[printer.forecast]`` settings, checked (keys, types, ranges); the others
    (random walk and process noise) come from the unit's estimator."""
    from controller.numerics.forecast import forecast_config_from_dict  # numerics: only when needed

    table = dict(printer.forecast)
    parsed = forecast_config_from_dict({"forecast": table}, where)
    return {key: getattr(parsed, key) for key in table}


def check_printer_settings(printer: PrinterSiteConfig, where: str) -> None:
    """Validate the ``[printer]`` sub-tables at site-file load time."""
    printer_policy_config(printer, where)
    printer_forecast_overrides(printer, where)


def _security(t: Mapping[str, Any], base: Path, src: str) -> SecurityConfig:
    w = f"{src} [security]"
    if "password" in t:
        raise ConfigError(
            f"{w} password: never put a password in the site file; use password_env "
            f"(an environment variable) or password_file (a file readable only by the service)."
        )
    check_keys(
        t,
        [
            "policy",
            "mode",
            "certificate",
            "private_key",
            "application_uri",
            "create_certificate",
            "trusted_servers",
            "user",
            "password_env",
            "password_file",
            "allow_insecure",
        ],
        w,
        required=["certificate", "private_key", "user"],
    )
    policy = _choice(t, "policy", w, "Basic256Sha256", POLICIES)
    allow_insecure = _bool(t, "allow_insecure", w, False)
    if policy == "None" and not allow_insecure:
        raise ConfigError(
            f"{w} policy = 'None' sends everything unsigned; set allow_insecure = true "
            f"for development, or choose {', '.join(POLICIES[:-1])}."
        )
    if ("password_env" in t) == ("password_file" in t):
        raise ConfigError(f"{w}: give exactly one of password_env or password_file.")
    cert = _path(base, t, "certificate", w)
    key = _path(base, t, "private_key", w)
    if cert is None or key is None:  # required above
        raise ConfigError(f"{w}: certificate and private_key are required.")
    return SecurityConfig(
        policy=policy,
        mode=_choice(t, "mode", w, "SignAndEncrypt", MODES),
        certificate=cert,
        private_key=key,
        application_uri=_str(t, "application_uri", w, "urn:hmpc:controller"),
        user=_str(t, "user", w),
        password_env=_opt_str(t, "password_env", w),
        password_file=_path(base, t, "password_file", w),
        create_certificate=_bool(t, "create_certificate", w, False),
        trusted_servers=_path(base, t, "trusted_servers", w),
        allow_insecure=allow_insecure,
        source=src,
    )


def _timing(t: Mapping[str, Any], src: str) -> TimingConfig:
    values = load_fields(TimingConfig, t, f"{src} [timing]")
    # an input may be a period and a half old before it is stale (at least the default)
    period = values.get("period_h", TimingConfig.period_h)
    values.setdefault("max_input_age_h", max(TimingConfig.max_input_age_h, 1.5 * period))
    return TimingConfig(**values)


def _clock(t: Mapping[str, Any], src: str) -> ClockConfig:
    w = f"{src} [clock]"
    check_keys(
        t, ["process_time", "batch_start", "speed"], w, required=["process_time", "batch_start"]
    )
    return ClockConfig(
        process_time=parse_node_ref(t["process_time"], f"{w} process_time"),
        batch_start=parse_node_ref(t["batch_start"], f"{w} batch_start"),
        speed=parse_node_ref(t["speed"], f"{w} speed") if "speed" in t else None,
    )


def _unit(
    name: str,
    t: Mapping[str, Any],
    shared_tags: Mapping[str, Any],
    shared_sps: Mapping[str, Any],
    apc_template: str,
    endpoints: Mapping[str, str],
    timing: TimingConfig,
    base: Path,
    src: str,
) -> UnitConfig:
    w = f"{src} [units.{name}]"
    if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
        raise ConfigError(f"{w}: unit names use letters, digits, '_' and '-' only.")
    check_keys(
        t,
        [
            "model",
            "controller",
            "mpc_config",
            "residual",
            "batch_id",
            "harvest_time_h",
            "endpoint",
            "apc",
            "tags",
            "setpoints",
        ],
        w,
        required=["model", "controller"],
    )
    model = _choice(t, "model", w, None, available_processes())
    controller = _choice(t, "controller", w, None, CONTROLLER_KINDS)
    endpoint = _str(t, "endpoint", w, "bioreactor")
    if endpoint not in endpoints:
        raise ConfigError(
            f"{w} endpoint = {endpoint!r} is not in [endpoints].{suggest(endpoint, endpoints)} "
            f"Known: {', '.join(endpoints)}."
        )
    mpc_config = _path(base, t, "mpc_config", w)
    residual = _path(base, t, "residual", w)
    if controller == "hybrid-mpc" and residual is None:
        raise ConfigError(f"{w}: controller 'hybrid-mpc' needs residual (a GP residual file).")
    for label, file in (("mpc_config", mpc_config), ("residual", residual)):
        if file is not None and not file.is_file():
            raise ConfigError(f"{w} {label}: file {file} not found.")
    units = canonical_units(model)
    own_tags = _table(t, "tags", w)
    tag_tables = {**shared_tags, **own_tags}

    def where(table: str, key: str, own: Mapping[str, Any]) -> str:
        if key in own:
            return f"{src} [units.{name}.{table}.{key}]"
        return f"{src} [{table}.{key}] (unit {name})"

    inputs = tuple(
        _input(
            key,
            _table(tag_tables, key, f"{src} [tags]"),
            name,
            units,
            timing,
            where("tags", key, own_tags),
        )
        for key in tag_tables
    )
    if not any(i.source == "online" for i in inputs):
        raise ConfigError(f"{w}: the tag map has no online input; add [tags.<variable>] tables.")
    own_sps = _table(t, "setpoints", w)
    sp_tables = {**shared_sps, **own_sps}
    names = input_names(model)
    unknown = [k for k in sp_tables if k not in names]
    if unknown:
        raise ConfigError(
            f"{w} setpoints: {unknown[0]!r} is not an input of the {model} model."
            f"{suggest(unknown[0], names)} Inputs: {', '.join(names)}."
        )
    setpoints = tuple(
        _setpoint(
            v, _table(sp_tables, v, f"{w} setpoints"), units[v], where("setpoints", v, own_sps)
        )
        if v in sp_tables
        else SetpointTag(v, v, UnitConversion(units[v], units[v]))
        for v in names
    )
    return UnitConfig(
        name=name,
        endpoint=endpoint,
        model=model,
        controller=controller,
        apc=parse_node_ref(_str(t, "apc", w, apc_template), f"{w} apc", unit=name),
        inputs=inputs,
        setpoints=setpoints,
        mpc_config=mpc_config,
        residual=residual,
        batch_id=_opt_str(t, "batch_id", w),
        harvest_time_h=_num(t, "harvest_time_h", w, None, 0.0, 1e5, "h", low_open=True),
    )


def _input(
    key: str,
    t: Mapping[str, Any],
    unit: str,
    units: Mapping[str, str],
    timing: TimingConfig,
    w: str,
) -> InputTag:
    check_keys(
        t,
        ["node", "variable", "unit", "source", "required", "max_age_h", "scale", "offset"],
        w,
        required=["node", "unit"],
    )
    variable = _str(t, "variable", w, key)
    if variable not in units:
        raise ConfigError(
            f"{w} variable {variable!r} is not a variable of the model.{suggest(variable, units)} "
            f"Known: {', '.join(sorted(units))}."
        )
    source = _choice(t, "source", w, "online", SOURCES)
    online = source == "online"
    return InputTag(
        key=key,
        variable=variable,
        node=parse_node_ref(t["node"], f"{w} node", unit=unit),
        conversion=conversion_for(
            variable,
            _str(t, "unit", w),
            units[variable],
            w,
            scale=_num(t, "scale", w, None, -math.inf, math.inf, "1"),
            offset=_num(t, "offset", w, None, -math.inf, math.inf, units[variable]),
        ),
        source=source,
        required=_bool(t, "required", w, online),
        max_age_h=_num(
            t,
            "max_age_h",
            w,
            timing.max_input_age_h if online else None,
            0.0,
            1e5,
            "h",
            low_open=True,
        ),
    )


def _setpoint(variable: str, t: Mapping[str, Any], canonical: str, w: str) -> SetpointTag:
    check_keys(
        t, ["item", "unit", "scale", "offset", "low", "high", "rate", "deadband", "fallback"], w
    )
    low = _num(t, "low", w, None, -math.inf, math.inf, canonical)
    high = _num(t, "high", w, None, -math.inf, math.inf, canonical)
    if low is not None and high is not None and low > high:
        raise ConfigError(f"{w}: low = {low} is above high = {high}.")
    fallback = _num(
        t,
        "fallback",
        w,
        None,
        -math.inf if low is None else low,
        math.inf if high is None else high,
        canonical,
    )
    return SetpointTag(
        variable=variable,
        item=_str(t, "item", w, variable),
        conversion=conversion_for(
            variable,
            _str(t, "unit", w, canonical),
            canonical,
            w,
            scale=_num(t, "scale", w, None, -math.inf, math.inf, "1"),
            offset=_num(t, "offset", w, None, -math.inf, math.inf, canonical),
        ),
        low=low,
        high=high,
        rate=_num(t, "rate", w, None, 0.0, math.inf, f"{canonical} per h", low_open=True),
        deadband=_num(t, "deadband", w, None, 0.0, math.inf, canonical),
        fallback=fallback,
    )

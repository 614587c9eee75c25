"""OPC UA plant simulators: bioreactors (LADS) and a bioprinter (OPC 40540 subset), secure,
with the plant-side APC handshake, on an accelerated process clock.

Entry point: ``async with serve_simulators(config) as sims: ...`` (``hmpc-sim serve`` wraps
it). The plant side (virtual bioreactors, APC logic, printer, faults) is plain Python; the
servers publish it and route method calls into it.

Who is calling: asyncua calls method handlers without the session. Each server replaces
``InternalServer.create_session`` so sessions are :class:`_HmpcSession`, which sets the
context variable :data:`sim.opcua.security.CALLING_USER` to the session's authenticated
identity around every Call and Write; the handlers (awaited in the same task) read it.
The same session class enforces the per-node write rules (Heartbeat: role ``apc`` only).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import os
import re
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import numpy as np
from asyncua import Server, ua
from asyncua.server.internal_session import InternalSession

from plant_models.errors import ConfigError, PlantIOError
from plant_models.process import DEFAULT_PROCESS, get_process
from sim.opcua.apc import (
    ApcInterface,
    ItemStatus,
    Mode,
    Role,
    default_apc_config,
    parse_fallback,
)
from sim.opcua.clock import ProcessClock
from sim.opcua.faults import Fault, FaultBook
from sim.opcua.hardened import GuardedSession, HardenedServer, PreauthenticatedUsers
from sim.opcua.lads import (
    DI_DEVICE_SET,
    NAME_NODEID_DATATYPE,
    Instantiator,
    NodeBuilder,
    argument,
    find_nodesets_dir,
    load_models,
    nodeid,
    status,
)
from sim.opcua.printer import JobOrder, PrinterSim, ReturnCode
from sim.opcua.security import (
    CALLING_USER,
    SECURE_POLICIES,
    FolderTrustList,
    Identity,
    LoginGuard,
    LoginPolicy,
    RoleUserManager,
    ensure_certificate,
    load_users,
)
from sim.patients import VirtualPatient, load_cohort_spec
from sim.plant import VirtualBioreactor
from sim.sensors import Measurement

__all__ = ["SimulatorConfig", "Simulators", "serve_simulators"]

log = logging.getLogger(__name__)

VT = ua.VariantType

#: Process variable -> LADS function BrowseName stem.
FUNCTION_NAMES = {
    "viable_cells": "ViableCellDensity",
    "viability": "Viability",
    "glucose": "Glucose",
    "lactate": "Lactate",
    "il2": "IL2",
    "glutamine": "Glutamine",
    "ammonia": "Ammonia",
    "perfusion_rate": "PerfusionPump",
    "glucose_feed": "GlucoseFeedPump",
    "il2_addition": "IL2Dosing",
    "feed_rate": "FeedPump",
}

#: Input -> (unit of its rate, totalized unit, factor from rate*h*volume to the total).
TOTALIZERS: dict[str, tuple[str, Callable[[float, float], float]]] = {
    "perfusion_rate": ("L", lambda rate, volume: rate / 24.0 * volume),  # 1/d x L -> L/h
    "glucose_feed": ("mL", lambda rate, volume: rate),  # mL/h
    "il2_addition": ("kIU", lambda rate, volume: rate),  # kIU/h
    "feed_rate": ("L", lambda rate, volume: rate),
}


def _camel(name: str) -> str:
    return FUNCTION_NAMES.get(name) or "".join(p.capitalize() for p in name.split("_"))


@dataclasses.dataclass(frozen=True)
class SimulatorConfig:
    """Settings of ``hmpc-sim serve``.

    Attributes:
        host, port: bioreactor server endpoint; the printer listens on ``printer_port``
            (default ``port + 1``; 0 for none).
        units: number of bioreactors (BR01, BR02, ...), unit ``i`` with patient seed
            ``patient_seed + i`` (nominal patient when ``patient_seed`` is None).
        speed: process hours per wall hour (3600: one process hour per second).
        pki: folder of certificates, trust list and (default) users file.
        dev_insecure: also offer SecurityPolicy None (development only).
        heartbeat_timeout_s: wall seconds without a heartbeat change before shedding.
        plant_step_h: process-time grid on which the plant is integrated.
        nodesets: node-opcua-nodesets folder (default: auto-detected); ``hand_built``
            forces the hand-built subset.
        fallback: what the watchdog's shed does to the setpoints (docs/opcua.md):
            ``"initial"`` (default: every setpoint back to its value at the batch start,
            the plant's low bound), ``"hold"`` (freeze the working setpoints) or
            ``"NAME=VALUE,..."`` (the named setpoints go there, the others are held).
        state_file: the plants' state is saved here (JSON, atomically, every
            ``state_interval_s`` wall seconds and at a clean stop) and, when the file exists
            at start, restored: the culture continues under the same BatchId and
            BatchStartTime, caught up to the time it would have reached (a restart sheds the
            controller: Local, fallback setpoints). None: every start is a new batch.
        login: back-off, lock-out and hashing limits of password logins.
    """

    host: str = "127.0.0.1"
    port: int = 4840
    printer_port: int | None = None
    units: int = 1
    speed: float = 1.0
    patient_seed: int | None = None
    sensor_seed: int = 0
    model: str = DEFAULT_PROCESS
    pki: Path = Path("pki")
    users_file: Path | None = None
    dev_insecure: bool = False
    heartbeat_timeout_s: float = 10.0
    plant_step_h: float = 0.1
    tick_s: float = 0.05
    nodesets: Path | None = None
    hand_built: bool = False
    faults: tuple[Fault, ...] = ()
    fallback: str = "initial"
    state_file: Path | None = None
    state_interval_s: float = 1.0
    login: LoginPolicy = dataclasses.field(default_factory=LoginPolicy)

    def __post_init__(self) -> None:
        if self.fallback not in ("hold", "initial"):
            parse_fallback(self.fallback)  # a ConfigError naming the expected form
        if not 1 <= self.units <= 99:
            raise ConfigError(f"--units must be in 1..99, got {self.units}")
        get_process(self.model)  # a ConfigError naming the registered processes
        for name in ("speed", "heartbeat_timeout_s", "plant_step_h", "tick_s", "state_interval_s"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ConfigError(f"{name} must be positive, got {value!r}")

    @property
    def printer_endpoint_port(self) -> int:
        return self.port + 1 if self.printer_port is None else self.printer_port

    @property
    def users_path(self) -> Path:
        return self.users_file if self.users_file is not None else self.pki / "users.toml"


# -- plant side ---------------------------------------------------------------------------------
class BioreactorUnit:
    """One virtual bioreactor with its APC interface (no OPC UA here)."""

    def __init__(self, name: str, plant: VirtualBioreactor, apc: ApcInterface) -> None:
        self.name = name
        self.plant = plant
        self.apc = apc
        self.batch_id = f"{name}-{plant.patient.patient_id}"
        self.state = "Running"
        self.latest: dict[tuple[str, str], Measurement] = {}
        self.totals: dict[str, float] = dict.fromkeys(apc.config.limits, 0.0)
        for m in plant.initial_measurements():
            self.latest[(m.source, m.name)] = m

    def advance(self, dt_h: float) -> None:
        applied = self.apc.advance(dt_h)
        volume = self.plant.true_values().get("volume", 1.0)
        for m in self.plant.step(applied, dt_h):
            self.latest[(m.source, m.name)] = m
        for name, rate in applied.items():
            if name in TOTALIZERS:
                self.totals[name] += TOTALIZERS[name][1](rate, volume) * dt_h


def _make_unit(config: SimulatorConfig, index: int, now: float) -> BioreactorUnit:
    name = f"BR{index + 1:02d}"
    if config.patient_seed is None:
        patient = VirtualPatient.nominal()
    else:
        patient = VirtualPatient.draw(config.patient_seed + index, load_cohort_spec()[0])
    seed = config.sensor_seed + index
    plant = VirtualBioreactor.for_process(config.model, patient, seed=seed)
    rates = plant.plugin.rate_limits(plant.process)
    units = {v.name: v.unit for v in plant.model.inputs}
    initial = {n: plant.bounds[n][0] for n in plant.model.input_names}
    fallback: dict[str, float] = {}
    if config.fallback == "initial":
        fallback = dict(initial)
    elif config.fallback != "hold":
        fallback = parse_fallback(config.fallback)
    apc_config = default_apc_config(
        plant.bounds,
        units,
        rates,
        heartbeat_timeout_s=config.heartbeat_timeout_s,
        fallback=fallback,
    )
    return BioreactorUnit(name, plant, ApcInterface(apc_config, initial, now))


# -- sessions that know their user ----------------------------------------------------------------
class _HmpcSession(GuardedSession):
    """Session that exposes its identity to method handlers and guards writes (and, from
    :class:`GuardedSession`, keeps its certificate and revises publishing intervals)."""

    users: RoleUserManager
    write_roles: dict[ua.NodeId, frozenset[Role]]

    def _identity(self) -> Identity | None:
        return self.users.identity(self.user)

    async def call(self, params: list[ua.CallMethodRequest]) -> list[ua.CallMethodResult]:
        token = CALLING_USER.set(self._identity())
        try:
            return await super().call(params)
        finally:
            CALLING_USER.reset(token)

    async def read(self, params: ua.ReadParameters) -> list[ua.DataValue]:
        """UserAccessLevel says what this session's role may do: CurrentWrite only where
        :meth:`write` would let it write."""
        results = list(await super().read(params))
        identity = self._identity()
        write_bit = ua.AccessLevel.CurrentWrite.mask
        for i, (item, dv) in enumerate(zip(params.NodesToRead, results, strict=True)):
            if item.AttributeId != ua.AttributeIds.UserAccessLevel or dv.Value is None:
                continue
            level = dv.Value.Value
            roles = self.write_roles.get(item.NodeId)
            if (
                isinstance(level, int)
                and level & write_bit
                and (roles is None or identity is None or identity.role not in roles)
            ):
                # a new DataValue: the one read is the address space's own
                results[i] = dataclasses.replace(
                    dv, Value=ua.Variant(level & ~write_bit, ua.VariantType.Byte)
                )
        return results

    async def write(self, params: ua.WriteParameters) -> list[ua.StatusCode]:
        identity = self._identity()
        allowed: list[ua.WriteValue] = []
        results: list[ua.StatusCode | None] = []
        for item in params.NodesToWrite:
            roles = self.write_roles.get(item.NodeId)
            if roles is None or identity is None or identity.role not in roles:
                who = identity.name if identity else "unknown"
                log.warning("write to %s by %s refused", item.NodeId.to_string(), who)
                results.append(status(ua.StatusCodes.BadUserAccessDenied))
            else:
                allowed.append(item)
                results.append(None)
        done = iter(
            await super().write(ua.WriteParameters(NodesToWrite=allowed)) if allowed else []
        )
        return [r if r is not None else next(done) for r in results]


def _install_sessions(
    server: Server, users: RoleUserManager, write_roles: dict[ua.NodeId, frozenset[Role]]
) -> None:
    iserver = server.iserver

    def create_session(name: str, user: Any = None, external: bool = False) -> InternalSession:
        kwargs = {} if user is None else {"user": user}
        session = _HmpcSession(
            iserver, iserver.aspace, iserver.subscription_service, name, external=external, **kwargs
        )
        session.users = users
        session.write_roles = write_roles
        return session

    iserver.create_session = create_session  # type: ignore[method-assign]


def _caller() -> Identity | None:
    return CALLING_USER.get()


_STATUS = {
    ItemStatus.GOOD: ua.StatusCodes.Good,
    ItemStatus.OUT_OF_RANGE: ua.StatusCodes.BadOutOfRange,
    ItemStatus.INVALID_STATE: ua.StatusCodes.BadInvalidState,
    ItemStatus.ACCESS_DENIED: ua.StatusCodes.BadUserAccessDenied,
    ItemStatus.UNKNOWN_ITEM: ua.StatusCodes.BadNodeIdUnknown,
}


def _ts(stamp: datetime) -> ua.DateTime:
    return cast(ua.DateTime, stamp)


def _dv(value: Any, vtype: ua.VariantType, stamp: datetime, code: int = 0) -> ua.DataValue:
    return ua.DataValue(
        Value=ua.Variant(value, vtype),
        StatusCode=status(code),
        SourceTimestamp=_ts(stamp),
        ServerTimestamp=_ts(datetime.now(UTC)),
    )


# -- common server set-up -------------------------------------------------------------------------
class _BaseServer:
    """An asyncua server with the security of docs/opcua.md; subclasses add the model."""

    kind = "base"

    def __init__(self, config: SimulatorConfig, port: int, sims: Simulators) -> None:
        self.config = config
        self.port = port
        self.sims = sims
        self.server: Server | None = None
        self.guard: LoginGuard | None = None
        self.write_roles: dict[ua.NodeId, frozenset[Role]] = {}
        self.ns = 0

    @property
    def endpoint(self) -> str:
        return f"opc.tcp://{self.config.host}:{self.port}/hmpc/{self.kind}"

    @property
    def application_uri(self) -> str:
        return f"urn:hmpc:sim:{self.kind}"

    async def start(self) -> None:
        cfg = self.config
        users = RoleUserManager(load_users(cfg.users_path))
        server = HardenedServer(user_manager=cast(Any, PreauthenticatedUsers()))
        trust = FolderTrustList(cfg.pki / "trusted", cfg.pki / "rejected")
        self.guard = LoginGuard(users, cfg.login)
        server.trust, server.guard = trust, self.guard
        server.max_unauthenticated = cfg.login.max_unauthenticated
        await server.init()
        server.set_endpoint(self.endpoint)
        server.set_server_name(f"hmpc simulated {self.kind}")
        await server.set_application_uri(self.application_uri)
        cert, key = await ensure_certificate(cfg.pki, f"hmpc-sim-{self.kind}", self.application_uri)
        await server.load_certificate(str(cert))
        await server.load_private_key(str(key))
        policies = list(SECURE_POLICIES)
        if cfg.dev_insecure:
            log.warning("%s: SecurityPolicy None offered (--dev-insecure)", self.kind)
            policies.insert(0, ua.SecurityPolicyType.NoSecurity)
        server.set_security_policy(policies)
        server.set_identity_tokens([ua.UserNameIdentityToken])
        server.set_certificate_validator(trust)
        _install_sessions(server, users, self.write_roles)
        self.server = server
        await self.build(server)
        await self.publish()  # clients never see the placeholders of a fresh address space
        try:
            await server.start()
        except OSError as exc:
            raise PlantIOError(f"{self.kind}: cannot listen on {self.endpoint}: {exc}") from exc
        log.info("%s server listening on %s", self.kind, self.endpoint)

    async def stop(self) -> None:
        server, self.server = self.server, None
        guard, self.guard = self.guard, None
        try:
            if server is not None:
                await server.stop()
        finally:
            if guard is not None:
                guard.close()

    async def build(self, server: Server) -> None:
        raise NotImplementedError

    async def publish(self) -> None:
        raise NotImplementedError

    async def _publish_clock(self, server: Server) -> None:
        """ProcessTime is the plant grid time (h); BatchStartTime the process epoch."""
        clock = self.sims.clock
        t = self.sims.process_h()
        stamp = clock.timestamp(t)
        await server.write_attribute_value(
            nodeid("Clock.ProcessTime", self.ns), _dv(t, VT.Double, stamp)
        )
        await server.write_attribute_value(
            nodeid("Clock.BatchStartTime", self.ns), _dv(clock.epoch, VT.DateTime, stamp)
        )

    async def _clock_nodes(self, b: NodeBuilder, root: ua.NodeId) -> None:
        clock = self.sims.clock
        node = await b.object(root, "Clock", ua.QualifiedName("Clock", self.ns), _base_object())
        await b.variable(
            node, "Clock.ProcessTime", ua.QualifiedName("ProcessTime", self.ns), 0.0, VT.Double
        )
        await b.variable(
            node,
            "Clock.BatchStartTime",
            ua.QualifiedName("BatchStartTime", self.ns),
            clock.epoch,
            VT.DateTime,
        )
        await b.variable(
            node, "Clock.Speed", ua.QualifiedName("Speed", self.ns), clock.speed, VT.Double
        )

    async def _fault_method(self, b: NodeBuilder, root: ua.NodeId) -> None:
        await b.method(
            root,
            "APC.InjectFault",
            ua.QualifiedName("InjectFault", self.ns),
            self._inject_fault,
            [
                argument("Kind", VT.String, "stale, stuck, nan, bad, restart, printer or clear"),
                argument("Target", VT.String, "e.g. BR01.glucose, BR01.* or *"),
                argument(
                    "DurationH",
                    VT.Double,
                    "process hours (restart: wall seconds); 0 = until cleared",
                ),
            ],
            [],
        )

    async def _inject_fault(
        self, parent: ua.NodeId, *args: ua.Variant
    ) -> ua.StatusCode | list[Any]:
        caller = _caller()
        if caller is None or caller.role not in (Role.OPERATOR, Role.ENGINEER):
            return status(ua.StatusCodes.BadUserAccessDenied)
        try:
            kind, target, duration = (a.Value for a in args)
            fault = Fault(str(kind), str(target) or "*", self.sims.process_h(), float(duration))
        except (ValueError, TypeError, ConfigError) as exc:
            log.warning("InjectFault refused: %s", exc)
            return status(ua.StatusCodes.BadInvalidArgument)
        log.warning("InjectFault %s by %s", fault, caller.name)
        self.sims.faults.add(fault)
        return []

    def _guard(self, nodeid: ua.NodeId, *roles: Role) -> None:
        self.write_roles[nodeid] = frozenset(roles)


def _base_object() -> ua.NodeId:
    return nodeid(ua.ObjectIds.BaseObjectType)


def _folder() -> ua.NodeId:
    return nodeid(ua.ObjectIds.FolderType)


# -- bioreactor server (LADS) ----------------------------------------------------------------------
@dataclasses.dataclass
class _UnitNodes:
    sensors: dict[tuple[str, str], ua.NodeId] = dataclasses.field(default_factory=dict)
    raw: dict[tuple[str, str], ua.NodeId] = dataclasses.field(default_factory=dict)
    current: dict[str, ua.NodeId] = dataclasses.field(default_factory=dict)
    target: dict[str, ua.NodeId] = dataclasses.field(default_factory=dict)
    totals: dict[str, ua.NodeId] = dataclasses.field(default_factory=dict)
    states: list[ua.NodeId] = dataclasses.field(default_factory=list)
    #: CurrentState.Id of the functional unit and control functions (official model only)
    state_ids: list[ua.NodeId] = dataclasses.field(default_factory=list)
    apc: dict[str, ua.NodeId] = dataclasses.field(default_factory=dict)
    published: dict[tuple[str, str], tuple[float, float]] = dataclasses.field(default_factory=dict)
    stuck: dict[tuple[str, str], float] = dataclasses.field(default_factory=dict)


class BioreactorServer(_BaseServer):
    kind = "bioreactor"

    def __init__(self, config: SimulatorConfig, port: int, sims: Simulators) -> None:
        super().__init__(config, port, sims)
        self.nodes: dict[str, _UnitNodes] = {}
        self.official_nodesets = False
        self.states: dict[str, ua.NodeId] = {}  # FunctionalUnitStateMachineType's, by name

    async def build(self, server: Server) -> None:
        cfg = self.config
        nodesets = None if cfg.hand_built else find_nodesets_dir(cfg.nodesets)
        ns = await load_models(server, nodesets, hand_built=cfg.hand_built)
        self.ns = ns.hmpc
        self.official_nodesets = ns.official
        b = NodeBuilder(server, ns.hmpc)
        device_set = nodeid(DI_DEVICE_SET, ns.di)
        apc_root = await b.object(
            nodeid(ua.ObjectIds.ObjectsFolder),
            "APC",
            ua.QualifiedName("APC", ns.hmpc),
            _folder(),
            reference=ua.ObjectIds.Organizes,
        )
        await self._clock_nodes(b, apc_root)
        await self._fault_method(b, apc_root)
        self.nodes = {}
        for unit in self.sims.units:
            nodes = _UnitNodes()
            self.nodes[unit.name] = nodes
            await self._build_unit(b, ns, device_set, unit, nodes)
            await self._build_apc(b, apc_root, unit, nodes)

    async def _build_unit(
        self,
        b: NodeBuilder,
        ns: Any,
        device_set: ua.NodeId,
        unit: BioreactorUnit,
        nodes: _UnitNodes,
    ) -> None:
        L = ns.lads
        u = unit.name
        device = await b.object(
            device_set, u, ua.QualifiedName(u, ns.hmpc), ns.lads_type("LADSDeviceType")
        )
        fus = await b.object(
            device,
            f"{u}.FunctionalUnitSet",
            ua.QualifiedName("FunctionalUnitSet", L),
            ns.lads_type("FunctionalUnitSetType"),
        )
        fu_path = f"{u}.Bioreactor"
        fu = await b.object(
            fus,
            fu_path,
            ua.QualifiedName("Bioreactor", ns.hmpc),
            ns.lads_type("FunctionalUnitType"),
        )
        state = await b.object(
            fu,
            f"{fu_path}.FunctionalUnitState",
            ua.QualifiedName("FunctionalUnitState", L),
            ns.lads_type("FunctionalUnitStateMachineType"),
        )
        nodes.apc["State"] = await b.variable(
            state,
            f"{fu_path}.FunctionalUnitState.CurrentState",
            ua.QualifiedName("CurrentState", 0),
            ua.LocalizedText(unit.state),
            VT.LocalizedText,
            typedef=ua.ObjectIds.FiniteStateVariableType,
        )
        inst = Instantiator(b)
        preset: dict[str, Any] = {}  # values of children the completion creates, by NodeId
        fsm_type = ns.lads_type("FunctionalUnitStateMachineType")
        for method in ("Start", "Stop", "Abort"):
            inputs, outputs = inst.method_arguments(fsm_type, f"{L}:{method}")
            await b.method(
                state,
                f"{fu_path}.FunctionalUnitState.{method}",
                ua.QualifiedName(method, L),
                self._state_handler(unit, method),
                inputs,
                outputs,
            )
        fset = await b.object(
            fu,
            f"{fu_path}.FunctionSet",
            ua.QualifiedName("FunctionSet", L),
            ns.lads_type("FunctionSetType"),
        )
        spec = unit.plant.sensors
        for source, table, suffix in (
            ("online", spec.online, "Sensor"),
            ("assay", spec.assays, "Assay"),
        ):
            for var, noise in table.items():
                fname = f"{_camel(var)}{suffix}"
                path = f"{fu_path}.FunctionSet.{fname}"
                func = await b.object(
                    fset,
                    path,
                    ua.QualifiedName(fname, ns.hmpc),
                    ns.lads_type("AnalogScalarSensorFunctionType"),
                )
                high = 1.0 if var == "viability" else 1e4
                m = unit.latest.get((source, var))
                nodes.sensors[(source, var)] = await b.analog(
                    func,
                    f"{path}.SensorValue",
                    ua.QualifiedName("SensorValue", L),
                    m.value if m is not None else math.nan,
                    noise.unit,
                    0.0,
                    high,
                )
                preset[f"{path}.IsEnabled"] = ua.Variant(True, VT.Boolean)
                if ns.official:  # the simulated reading is also the raw one (no calibration)
                    nodes.raw[(source, var)] = await b.analog(
                        func,
                        f"{path}.RawValue",
                        ua.QualifiedName("RawValue", L),
                        m.value if m is not None else math.nan,
                        noise.unit,
                        0.0,
                        high,
                    )
        for name, lim in unit.apc.config.limits.items():
            fname = _camel(name)
            path = f"{fu_path}.FunctionSet.{fname}"
            typename = (
                "AnalogControlFunctionWithTotalizerType"
                if name in TOTALIZERS
                else "AnalogControlFunctionType"
            )
            func = await b.object(
                fset, path, ua.QualifiedName(fname, ns.hmpc), ns.lads_type(typename)
            )
            preset[f"{path}.IsEnabled"] = ua.Variant(True, VT.Boolean)
            cfs = await b.object(
                func,
                f"{path}.ControlFunctionState",
                ua.QualifiedName("ControlFunctionState", L),
                ns.lads_type("ControlFunctionStateMachineType"),
            )
            nodes.states.append(
                await b.variable(
                    cfs,
                    f"{path}.ControlFunctionState.CurrentState",
                    ua.QualifiedName("CurrentState", 0),
                    ua.LocalizedText(unit.state),
                    VT.LocalizedText,
                    typedef=ua.ObjectIds.FiniteStateVariableType,
                )
            )
            nodes.current[name] = await b.analog(
                func,
                f"{path}.CurrentValue",
                ua.QualifiedName("CurrentValue", L),
                unit.apc.working[name],
                lim.unit,
                lim.low,
                lim.high,
            )
            nodes.target[name] = await b.analog(
                func,
                f"{path}.TargetValue",
                ua.QualifiedName("TargetValue", L),
                unit.apc.targets[name],
                lim.unit,
                lim.low,
                lim.high,
            )
            if name in TOTALIZERS:
                nodes.totals[name] = await b.analog(
                    func,
                    f"{path}.TotalizedValue",
                    ua.QualifiedName("TotalizedValue", L),
                    0.0,
                    TOTALIZERS[name][0],
                    0.0,
                    1e9,
                )
        pm = await b.object(
            fu,
            f"{fu_path}.ProgramManager",
            ua.QualifiedName("ProgramManager", L),
            ns.lads_type("ProgramManagerType"),
        )
        node_set = await b.object(
            pm,
            f"{fu_path}.ProgramManager.ProgramTemplateSet",
            ua.QualifiedName("ProgramTemplateSet", L),
            ns.lads_type("ProgramTemplateSetType"),
        )
        await b.property(
            node_set, f"{fu_path}.ProgramManager.ProgramTemplateSet.NodeVersion", "NodeVersion", "1"
        )
        node_set = await b.object(
            pm,
            f"{fu_path}.ProgramManager.ResultSet",
            ua.QualifiedName("ResultSet", L),
            ns.lads_type("ResultSetType"),
        )
        await b.property(
            node_set, f"{fu_path}.ProgramManager.ResultSet.NodeVersion", "NodeVersion", "1"
        )
        active = await b.object(
            pm,
            f"{fu_path}.ProgramManager.ActiveProgram",
            ua.QualifiedName("ActiveProgram", L),
            ns.lads_type("ActiveProgramType"),
        )
        template = f"{unit.plant.kind}-expansion"
        if ns.official:  # AMB's NameNodeIdDataType {Name, Id}, as LADS declares
            await b.variable(
                active,
                f"{fu_path}.ProgramManager.ActiveProgram.CurrentProgramTemplate",
                ua.QualifiedName("CurrentProgramTemplate", L),
                ua.NameNodeIdDataType(  # type: ignore[attr-defined]
                    Name=ua.LocalizedText(template), NodeId=ua.NodeId()
                ),
                VT.ExtensionObject,
                typedef=ua.ObjectIds.PropertyType,
                reference=ua.ObjectIds.HasProperty,
                datatype=nodeid(NAME_NODEID_DATATYPE, ns.amb),
            )
        else:
            await b.variable(
                active,
                f"{fu_path}.ProgramManager.ActiveProgram.CurrentProgramTemplate",
                ua.QualifiedName("CurrentProgramTemplate", L),
                template,
                VT.String,
            )
        await b.variable(
            active,
            f"{fu_path}.ProgramManager.ActiveProgram.SupervisoryJobId",
            ua.QualifiedName("SupervisoryJobId", L),
            unit.batch_id,
            VT.String,
        )
        await b.variable(
            active,
            f"{fu_path}.ProgramManager.ActiveProgram.PatientId",
            ua.QualifiedName("PatientId", ns.hmpc),
            unit.plant.patient.patient_id,
            VT.String,
        )
        nodes.apc["Runtime"] = await b.variable(
            active,
            f"{fu_path}.ProgramManager.ActiveProgram.CurrentRuntime",
            ua.QualifiedName("CurrentRuntime", L),
            0.0,
            VT.Double,
            typedef=ua.ObjectIds.PropertyType,
            reference=ua.ObjectIds.HasProperty,
            datatype=nodeid(ua.ObjectIds.Duration),  # milliseconds
        )
        if ns.official:  # every Mandatory child of the official types, recursively
            self.states = inst.states(fsm_type)
            device_states = inst.states(ns.lads_type("LADSDeviceStateMachineType"))
            values = _device_values(u) | preset
            values[f"{u}.DeviceState.CurrentState"] = ua.Variant(
                ua.LocalizedText("Operate"), VT.LocalizedText
            )
            values[f"{u}.DeviceState.CurrentState.Id"] = ua.Variant(
                device_states["Operate"], VT.NodeId
            )
            available = ua.Variant(list(self.states.values()), VT.NodeId, is_array=True)
            machines = [f"{fu_path}.FunctionalUnitState"]
            machines += [str(n.Identifier).rsplit(".", 1)[0] for n in nodes.states]
            for machine in machines:
                values[f"{machine}.AvailableStates"] = available
                nodes.state_ids.append(b.nid(f"{machine}.CurrentState.Id"))
            await inst.complete(device, values=values)

    async def _build_apc(
        self, b: NodeBuilder, root: ua.NodeId, unit: BioreactorUnit, nodes: _UnitNodes
    ) -> None:
        n = self.ns
        u = unit.name
        obj = await b.object(root, f"APC.{u}", ua.QualifiedName(u, n), _base_object())
        apc = unit.apc
        hb = await b.variable(
            obj, f"APC.{u}.Heartbeat", ua.QualifiedName("Heartbeat", n), 0, VT.UInt32, writable=True
        )
        self._guard(hb, Role.APC)
        nodes.apc["Heartbeat"] = hb
        for name, value, vtype in (
            ("Mode", int(apc.mode), VT.Int32),
            ("ModeName", apc.mode.name.capitalize(), VT.String),
            ("Fallback", apc.fallback, VT.Boolean),
            ("ShedCount", apc.shed_count, VT.UInt32),
            ("HeartbeatHealthy", False, VT.Boolean),
            ("HeartbeatTimeout", apc.config.heartbeat_timeout_s, VT.Double),
            ("BatchId", unit.batch_id, VT.String),
        ):
            nodes.apc[name] = await b.variable(
                obj, f"APC.{u}.{name}", ua.QualifiedName(name, n), value, vtype
            )
        names = list(apc.config.limits)
        await b.variable(
            obj,
            f"APC.{u}.SetpointNames",
            ua.QualifiedName("SetpointNames", n),
            names,
            VT.String,
            array=True,
        )
        for key, values in (
            ("Setpoints", apc.targets),
            ("WorkingSetpoints", apc.working),
            ("FallbackSetpoints", apc.fallback_setpoints),  # NaN: held on shed
        ):
            nodes.apc[key] = await b.variable(
                obj,
                f"APC.{u}.{key}",
                ua.QualifiedName(key, n),
                [values.get(k, math.nan) for k in names],
                VT.Double,
                array=True,
            )
        for key, attr in (
            ("SetpointLow", "low"),
            ("SetpointHigh", "high"),
            ("RateUp", "rate_up"),
            ("RateDown", "rate_down"),
            ("Deadband", "deadband"),
        ):
            vals = [float(getattr(apc.config.limits[k], attr)) for k in names]
            vals = [v if math.isfinite(v) else 1e300 for v in vals]
            await b.variable(
                obj, f"APC.{u}.{key}", ua.QualifiedName(key, n), vals, VT.Double, array=True
            )

        async def write_setpoints(
            parent: ua.NodeId, *args: ua.Variant
        ) -> ua.StatusCode | list[ua.Variant]:
            result = self._write_setpoints(unit, nodes, args)
            if self.server is not None:
                await self._publish_apc(self.server, unit, self.sims.clock.wall())
            return result

        async def request_mode(
            parent: ua.NodeId, *args: ua.Variant
        ) -> ua.StatusCode | list[ua.Variant]:
            result = self._request_mode(unit, args)
            if self.server is not None:
                await self._publish_apc(self.server, unit, self.sims.clock.wall())
            return result

        await b.method(
            obj,
            f"APC.{u}.WriteSetpoints",
            ua.QualifiedName("WriteSetpoints", n),
            write_setpoints,
            [
                argument("Names", VT.String, "setpoint names (SetpointNames)", array=True),
                argument("Values", VT.Double, "values in the canonical units", array=True),
            ],
            [argument("Results", VT.StatusCode, "one status per item", array=True)],
        )

        async def set_fallback(
            parent: ua.NodeId, *args: ua.Variant
        ) -> ua.StatusCode | list[ua.Variant]:
            result = self._write_setpoints(unit, nodes, args, fallback=True)
            if self.server is not None:
                await self._publish_apc(self.server, unit, self.sims.clock.wall())
            return result

        await b.method(
            obj,
            f"APC.{u}.SetFallbackSetpoints",
            ua.QualifiedName("SetFallbackSetpoints", n),
            set_fallback,
            [
                argument("Names", VT.String, "setpoint names (SetpointNames)", array=True),
                argument("Values", VT.Double, "safe values on shed, canonical units", array=True),
            ],
            [argument("Results", VT.StatusCode, "one status per item", array=True)],
        )
        await b.method(
            obj,
            f"APC.{u}.RequestMode",
            ua.QualifiedName("RequestMode", n),
            request_mode,
            [argument("Mode", VT.Int32, "0 Local, 1 Remote (operator only)")],
            [argument("Result", VT.StatusCode, "Good, BadInvalidState or BadUserAccessDenied")],
        )

    def _state_handler(self, unit: BioreactorUnit, method: str) -> Callable[..., Any]:
        """FunctionalUnitState methods (operator): Start -> Running; Stop / Abort -> Stopped /
        Aborted with Local mode and every setpoint at its lower limit (pumps off)."""

        async def handler(parent: ua.NodeId, *args: ua.Variant) -> ua.StatusCode | list[Any]:
            caller = _caller()
            if caller is None or caller.role is not Role.OPERATOR:
                return status(ua.StatusCodes.BadUserAccessDenied)
            if method == "Start":
                if unit.state == "Aborted":
                    return status(ua.StatusCodes.BadInvalidState)
                unit.state = "Running"
            else:
                unit.state = "Stopped" if method == "Stop" else "Aborted"
                unit.apc.request_mode(
                    Mode.LOCAL, Role.OPERATOR, self.sims.clock.wall(), caller.name
                )
                for name, lim in unit.apc.config.limits.items():
                    unit.apc.targets[name] = unit.apc.working[name] = lim.low
            log.warning("%s: %s by %s -> %s", unit.name, method, caller.name, unit.state)
            if self.server is not None:
                await self._publish_apc(self.server, unit, self.sims.clock.wall())
            return []

        return handler

    def _write_setpoints(
        self,
        unit: BioreactorUnit,
        nodes: _UnitNodes,
        args: Sequence[ua.Variant],
        *,
        fallback: bool = False,
    ) -> ua.StatusCode | list[ua.Variant]:
        """WriteSetpoints (role apc), or with ``fallback`` SetFallbackSetpoints (operator,
        engineer: the safe state applied at the next shed)."""
        caller = _caller()
        if len(args) != 2:
            return status(ua.StatusCodes.BadArgumentsMissing)
        names, values = args[0].Value, args[1].Value
        if (
            not isinstance(names, list)
            or not isinstance(values, list)
            or len(names) != len(values)
            or args[0].VariantType is not VT.String
            or args[1].VariantType is not VT.Double  # exact types: a Float is refused
        ):
            return status(ua.StatusCodes.BadInvalidArgument)
        if caller is None:
            statuses = [ItemStatus.ACCESS_DENIED] * len(names)
        elif fallback:
            statuses = [
                unit.apc.set_fallback(str(n), float(v), caller.role, caller.name)
                for n, v in zip(names, values, strict=True)
            ]
        else:
            statuses = unit.apc.write_setpoints(
                names, values, caller.role, self.sims.clock.wall(), caller.name
            )
        codes = [status(_STATUS[s]) for s in statuses]
        return [ua.Variant(codes, VT.StatusCode, is_array=True)]

    def _request_mode(
        self, unit: BioreactorUnit, args: Sequence[ua.Variant]
    ) -> ua.StatusCode | list[ua.Variant]:
        caller = _caller()
        if len(args) != 1 or not isinstance(args[0].Value, int):
            return status(ua.StatusCodes.BadInvalidArgument)
        try:
            mode = Mode(args[0].Value)
        except ValueError:
            return status(ua.StatusCodes.BadInvalidArgument)
        if caller is None:
            result = ItemStatus.ACCESS_DENIED
        elif mode is Mode.REMOTE and unit.state != "Running":
            result = ItemStatus.INVALID_STATE  # a stopped or aborted unit takes no APC
        else:
            result = unit.apc.request_mode(mode, caller.role, self.sims.clock.wall(), caller.name)
        return [ua.Variant(status(_STATUS[result]), VT.StatusCode)]

    async def read_heartbeats(self) -> None:
        if self.server is None:
            return
        now = self.sims.clock.wall()
        for unit in self.sims.units:
            dv = self.server.iserver.aspace.read_attribute_value(
                self.nodes[unit.name].apc["Heartbeat"], ua.AttributeIds.Value
            )
            if dv.Value is not None and isinstance(dv.Value.Value, int):
                unit.apc.beat(dv.Value.Value, now)

    async def publish(self) -> None:
        server = self.server
        if server is None:
            return
        clock = self.sims.clock
        faults = self.sims.faults
        now_wall = clock.wall()
        for unit in self.sims.units:
            nodes = self.nodes[unit.name]
            t = unit.plant.time_h
            for key, node in nodes.sensors.items():
                m = unit.latest.get(key)
                if m is None:
                    continue
                kind = faults.sensor_fault(unit.name, m.name, t)
                if kind != "stuck":
                    nodes.stuck.pop(key, None)
                if kind == "stale":
                    continue
                value, code = m.value, _quality(m.quality)
                if kind == "stuck":
                    value = nodes.stuck.setdefault(key, nodes.published.get(key, (value, 0.0))[0])
                elif kind == "nan":
                    value = math.nan
                elif kind == "bad":
                    code = ua.StatusCodes.BadSensorFailure
                sample = m.sample_time if kind != "stuck" else t
                mark = (value, sample)
                if nodes.published.get(key) == mark and kind is None:
                    continue
                nodes.published[key] = mark
                dv = _dv(value, VT.Double, clock.timestamp(sample), code)
                await server.write_attribute_value(node, dv)
                if key in nodes.raw:
                    await server.write_attribute_value(nodes.raw[key], dv)
            await self._publish_apc(server, unit, now_wall)
        await self._publish_clock(server)

    async def _publish_apc(self, server: Server, unit: BioreactorUnit, now_wall: float) -> None:
        """Control functions and APC variables of one unit (also right after a method call,
        so a client sees a mode change or new targets without waiting for the next tick)."""
        nodes = self.nodes[unit.name]
        t = unit.plant.time_h
        stamp = self.sims.clock.timestamp(t)
        for name, node in nodes.current.items():
            await server.write_attribute_value(node, _dv(unit.apc.working[name], VT.Double, stamp))
            await server.write_attribute_value(
                nodes.target[name], _dv(unit.apc.targets[name], VT.Double, stamp)
            )
        for name, node in nodes.totals.items():
            await server.write_attribute_value(node, _dv(unit.totals[name], VT.Double, stamp))
        apc = unit.apc
        names = list(apc.config.limits)
        apc_values: tuple[tuple[str, Any, ua.VariantType], ...] = (
            ("Mode", int(apc.mode), VT.Int32),
            ("ModeName", apc.mode.name.capitalize(), VT.String),
            ("Fallback", apc.fallback, VT.Boolean),
            ("ShedCount", apc.shed_count, VT.UInt32),
            ("HeartbeatHealthy", apc.heartbeat_healthy(now_wall), VT.Boolean),
            ("Runtime", t * 3.6e6, VT.Double),  # Duration: ms
            ("State", ua.LocalizedText(unit.state), VT.LocalizedText),
        )
        for label, val, vtype in apc_values:
            await server.write_attribute_value(nodes.apc[label], _dv(val, vtype, stamp))
        state_id = self.states.get(unit.state)
        for node in nodes.state_ids if state_id is not None else []:
            await server.write_attribute_value(node, _dv(state_id, VT.NodeId, stamp))
        for node in nodes.states:  # control functions follow the functional unit
            await server.write_attribute_value(
                node, _dv(ua.LocalizedText(unit.state), VT.LocalizedText, stamp)
            )
        await server.write_attribute_value(
            nodes.apc["Setpoints"],
            ua.DataValue(
                Value=ua.Variant([apc.targets[k] for k in names], VT.Double, is_array=True),
                SourceTimestamp=_ts(stamp),
                ServerTimestamp=_ts(datetime.now(UTC)),
            ),
        )
        await server.write_attribute_value(
            nodes.apc["FallbackSetpoints"],
            ua.DataValue(
                Value=ua.Variant(
                    [apc.fallback_setpoints.get(k, math.nan) for k in names],
                    VT.Double,
                    is_array=True,
                ),
                SourceTimestamp=_ts(stamp),
                ServerTimestamp=_ts(datetime.now(UTC)),
            ),
        )
        await server.write_attribute_value(
            nodes.apc["WorkingSetpoints"],
            ua.DataValue(
                Value=ua.Variant([apc.working[k] for k in names], VT.Double, is_array=True),
                SourceTimestamp=_ts(stamp),
                ServerTimestamp=_ts(datetime.now(UTC)),
            ),
        )


def _device_values(unit: str) -> dict[str, Any]:
    """Values of the DI/Machinery identification of a simulated device (by NodeId)."""
    text = {
        "Manufacturer": ua.LocalizedText("hmpc simulator"),
        "Model": ua.LocalizedText("virtual bioreactor"),
        "ComponentName": ua.LocalizedText(unit),
    }
    plain = {
        "SerialNumber": f"SIM-{unit}",
        "ProductInstanceUri": f"urn:hmpc:sim:bioreactor:{unit}",
        "HardwareRevision": "1",
        "SoftwareRevision": "1",
        "DeviceRevision": "1",
        "AssetId": unit,
    }
    out: dict[str, Any] = {}
    for prefix in (unit, f"{unit}.Identification"):
        for key, label in text.items():
            out[f"{prefix}.{key}"] = ua.Variant(label, VT.LocalizedText)
        for key, value in plain.items():
            out[f"{prefix}.{key}"] = ua.Variant(value, VT.String)
        out[f"{prefix}.RevisionCounter"] = ua.Variant(0, VT.Int32)
    return out


def _quality(quality: str) -> int:
    if quality == "good":
        return int(ua.StatusCodes.Good)
    if quality == "uncertain":
        return int(ua.StatusCodes.Uncertain)
    return int(ua.StatusCodes.Bad)


# -- printer server (OPC 40540 subset) -------------------------------------------------------------
class PrinterServer(_BaseServer):
    kind = "printer"

    def __init__(self, config: SimulatorConfig, port: int, sims: Simulators) -> None:
        super().__init__(config, port, sims)
        self.monitoring: dict[str, ua.NodeId] = {}
        self.job_nodes: dict[str, dict[str, ua.NodeId]] = {}
        self.jobs_folder: ua.NodeId | None = None
        self.state_node: ua.NodeId | None = None
        self.fault_node: ua.NodeId | None = None
        self.builder: NodeBuilder | None = None
        self.am = 0
        self.official_nodesets = False
        self.states: dict[str, ua.NodeId] = {}  # MachineryItemState_StateMachineType's
        self.state_id_node: ua.NodeId | None = None
        self.isa95_list: ua.NodeId | None = None  # ISA-95 JobOrderControl.JobOrderList
        self.isa95_numbers: dict[str, int] = {}  # job state name -> ISA-95 StateNumber
        self.isa95_published: list[Any] | None = None

    async def build(self, server: Server) -> None:
        from sim.opcua import lads

        cfg = self.config
        nodesets = None if cfg.hand_built else find_nodesets_dir(cfg.nodesets)
        if nodesets is not None:  # DI, Machinery, ISA-95 job control, Machinery Jobs
            await lads.import_nodesets(server, nodesets, lads.PRINTER_NODESET_FILES)
        self.official_nodesets = nodesets is not None
        self.am = await server.register_namespace(lads.AM_URI)
        jobs_ns = await server.register_namespace(lads.JOBS_URI)
        self.ns = await server.register_namespace(lads.HMPC_URI)
        di = await server.register_namespace(lads.DI_URI)
        machinery = await server.register_namespace(lads.MACHINERY_URI)
        isa95 = await server.register_namespace(lads.ISA95_URI)

        def official(ident: int, ns: int) -> ua.NodeId:
            return nodeid(ident, ns) if nodesets is not None else _base_object()

        b = NodeBuilder(server, self.ns)
        self.builder = b
        objects = nodeid(ua.ObjectIds.ObjectsFolder)
        root = await b.object(
            objects,
            "APC",
            ua.QualifiedName("APC", self.ns),
            _folder(),
            reference=ua.ObjectIds.Organizes,
        )
        await self._clock_nodes(b, root)
        await self._fault_method(b, root)
        am = self.am
        machine = await b.object(
            objects,
            "Printer",
            ua.QualifiedName("Bioprinter", am),
            _base_object(),
            reference=ua.ObjectIds.Organizes,
        )
        if nodesets is not None:  # a machine of OPC 40001-1: listed in Machinery:Machines
            await server.get_node(nodeid(lads.MACHINERY_MACHINES, machinery)).add_reference(
                machine, nodeid(ua.ObjectIds.Organizes)
            )
        # Machinery identification AddIn (DI:Identification); its properties are in DI
        ident = await b.object(
            machine,
            "Printer.Identification",
            ua.QualifiedName("Identification", di),
            official(lads.MACHINERY_IDENTIFICATION_TYPE, machinery),
            reference=17604 if nodesets is not None else ua.ObjectIds.HasComponent,  # HasAddIn
        )
        for key, text in (("Manufacturer", "hmpc simulator"), ("Model", "virtual bioprinter")):
            await b.variable(
                ident,
                f"Printer.Identification.{key}",
                ua.QualifiedName(key, di),
                ua.LocalizedText(text),
                VT.LocalizedText,
                typedef=ua.ObjectIds.PropertyType,
                reference=ua.ObjectIds.HasProperty,
            )
        for key, value in (
            ("SerialNumber", "SIM-0001"),
            ("ProductInstanceUri", "urn:hmpc:sim:printer:SIM-0001"),
        ):
            await b.variable(
                ident,
                f"Printer.Identification.{key}",
                ua.QualifiedName(key, di),
                value,
                VT.String,
                typedef=ua.ObjectIds.PropertyType,
                reference=ua.ObjectIds.HasProperty,
            )
        await b.variable(  # OPC 40540 is not available: the technology in the AM namespace
            ident,
            "Printer.Identification.AMTechnology",
            ua.QualifiedName("AMTechnology", am),
            "MaterialExtrusion",
            VT.String,
        )
        mon = await b.object(
            machine, "Printer.Monitoring", ua.QualifiedName("Monitoring", am), _base_object()
        )
        units = {
            "NozzleTemperature": ("degC", 0.0, 250.0),
            "CartridgeTemperature": ("degC", 0.0, 250.0),
            "BedTemperature": ("degC", -20.0, 120.0),
            "ExtrusionPressure": ("kPa", 0.0, 1000.0),
            "UVCrosslinkDose": ("mJ/cm2", 0.0, 1e9),
        }
        for key, reading in self.sims.printer.monitoring().items():
            unit, low, high = units[key]
            self.monitoring[key] = await b.analog(
                mon,
                f"Printer.Monitoring.{key}",
                ua.QualifiedName(key, am),
                reading,
                unit,
                low,
                high,
            )
        state = await b.object(
            machine,
            "Printer.MachineryItemState",
            ua.QualifiedName("MachineryItemState", machinery),
            official(lads.MACHINERY_ITEM_STATE_TYPE, machinery),
            reference=17604 if nodesets is not None else ua.ObjectIds.HasComponent,  # HasAddIn
        )
        self.state_node = await b.variable(
            state,
            "Printer.MachineryItemState.CurrentState",
            ua.QualifiedName("CurrentState", 0),
            ua.LocalizedText(self.sims.printer.machine_state()),
            VT.LocalizedText,
            typedef=ua.ObjectIds.FiniteStateVariableType,
        )
        self.fault_node = await b.variable(
            machine, "Printer.Fault", ua.QualifiedName("Fault", self.ns), "", VT.String
        )
        jm = await b.object(
            machine,
            "Printer.JobManagement",
            ua.QualifiedName("JobManagement", jobs_ns),
            official(lads.JOB_MANAGEMENT_TYPE, jobs_ns),
            reference=17604 if nodesets is not None else ua.ObjectIds.HasComponent,  # HasAddIn
        )
        control = await b.object(
            jm,
            "Printer.JobManagement.JobOrderControl",
            ua.QualifiedName("JobOrderControl", jobs_ns),
            official(lads.ISA95_JOB_ORDER_RECEIVER_TYPE, isa95),
        )
        self.jobs_folder = await b.object(
            jm,
            "Printer.JobManagement.JobOrderList",
            ua.QualifiedName("JobOrderList", jobs_ns),
            _folder(),
            reference=ua.ObjectIds.Organizes,
        )
        self.job_nodes = {}
        job_args = [
            argument("JobOrderId", VT.String, "unique job order id"),
            argument("PatientId", VT.String, "patient id"),
            argument("BatchId", VT.String, "batch id (bioreactor SupervisoryJobId)"),
            argument("CellCount", VT.Double, "viable cells to print, 1e9 cells"),
            argument("BioinkCellDensity", VT.Double, "cell density in the bioink, 1e6 cells/mL"),
            argument(
                "ScheduledStart", VT.DateTime, "process timestamp (BatchStartTime + process time)"
            ),
        ]
        ret = [
            argument(
                "ReturnValue",
                VT.UInt64,
                "0 ok; 1 unknown id; 2 invalid state; 4 rejected; 8 not allowed",
            )
        ]
        for method in ("Store", "StoreAndStart"):
            await b.method(
                control,
                f"Printer.JobManagement.JobOrderControl.{method}",
                ua.QualifiedName(method, jobs_ns),
                self._store_handler(method == "StoreAndStart"),
                job_args,
                ret,
            )
        await b.method(
            control,
            "Printer.JobManagement.JobOrderControl.Update",
            ua.QualifiedName("Update", jobs_ns),
            self._update,
            job_args,
            ret,
        )
        for method in ("Start", "Stop", "Pause", "Resume", "Abort", "Cancel", "Clear"):
            await b.method(
                control,
                f"Printer.JobManagement.JobOrderControl.{method}",
                ua.QualifiedName(method, jobs_ns),
                self._command_handler(method),
                [argument("JobOrderId", VT.String, "job order id")],
                ret,
            )
        await b.method(
            machine,
            "Printer.ClearFault",
            ua.QualifiedName("ClearFault", self.ns),
            self._clear_fault,
            [],
            ret,
        )
        if nodesets is not None:  # every Mandatory child of the official types
            inst = Instantiator(b)
            self.states = inst.states(official(lads.MACHINERY_ITEM_STATE_TYPE, machinery))
            await inst.complete(machine)
            self.state_id_node = b.nid("Printer.MachineryItemState.CurrentState.Id")
            self.isa95_list = b.nid("Printer.JobManagement.JobOrderControl.JobOrderList")
            self.isa95_numbers = {
                name: inst.state_number(state)
                for name, state in inst.states(
                    official(lads.ISA95_JOB_ORDER_RECEIVER_TYPE, isa95)
                ).items()
            }
        for job in self.sims.printer.jobs.values():
            await self._add_job_nodes(job)

    def _allowed(self) -> Identity | None:
        caller = _caller()
        if caller is None or caller.role not in (Role.APC, Role.OPERATOR):
            return None
        return caller

    def _parse_job(self, args: Sequence[ua.Variant]) -> JobOrder:
        """A job order from the Store/Update arguments (TypeError/ValueError if malformed)."""
        job_id, patient, batch, cells, density, when = (a.Value for a in args)
        if not isinstance(when, datetime):
            raise TypeError("ScheduledStart must be a DateTime")
        return JobOrder(
            str(job_id),
            str(patient),
            str(batch),
            float(cells),
            float(density),
            self.sims.clock.to_process_h(when),
        )

    def _store_handler(self, start: bool) -> Callable[..., Any]:
        async def handler(parent: ua.NodeId, *args: ua.Variant) -> list[ua.Variant] | ua.StatusCode:
            caller = self._allowed()
            if caller is None:
                return _ret(ReturnCode.INVALID_REQUEST)
            try:
                job = self._parse_job(args)
            except (TypeError, ValueError):
                return status(ua.StatusCodes.BadInvalidArgument)
            code, why = self.sims.printer.store(job, start=start, now_h=self.sims.process_h())
            log.info(
                "printer: Store%s %s by %s -> %s %s",
                "AndStart" if start else "",
                job.job_id,
                caller.name,
                code.name,
                why,
            )
            if code is ReturnCode.OK:
                await self._add_job_nodes(job)
            return _ret(code)

        return handler

    async def _update(
        self, parent: ua.NodeId, *args: ua.Variant
    ) -> list[ua.Variant] | ua.StatusCode:
        caller = self._allowed()
        if caller is None:
            return _ret(ReturnCode.INVALID_REQUEST)
        try:
            job = self._parse_job(args)
        except (TypeError, ValueError):
            return status(ua.StatusCodes.BadInvalidArgument)
        code, why = self.sims.printer.update(job, now_h=self.sims.process_h())
        log.info("printer: Update %s by %s -> %s %s", job.job_id, caller.name, code.name, why)
        nodes = self.job_nodes.get(job.job_id)
        if code is ReturnCode.OK and nodes is not None and self.server is not None:
            stamp = self.sims.clock.timestamp(self.sims.process_h())
            for key, value, vtype in (
                ("PatientId", job.patient_id, VT.String),
                ("BatchId", job.batch_id, VT.String),
                ("CellCount", job.cell_count, VT.Double),
                ("BioinkCellDensity", job.bioink_density, VT.Double),
                ("ScheduledStart", self.sims.clock.timestamp(job.scheduled_start_h), VT.DateTime),
            ):
                await self.server.write_attribute_value(nodes[key], _dv(value, vtype, stamp))
        return _ret(code)

    def _command_handler(self, method: str) -> Callable[..., Any]:
        async def handler(parent: ua.NodeId, *args: ua.Variant) -> list[ua.Variant] | ua.StatusCode:
            caller = self._allowed()
            if caller is None:
                return _ret(ReturnCode.INVALID_REQUEST)
            if len(args) != 1 or not isinstance(args[0].Value, str):
                return status(ua.StatusCodes.BadInvalidArgument)
            job_id = args[0].Value
            code = self.sims.printer.command(job_id, method, self.sims.process_h())
            log.info("printer: %s %s by %s -> %s", method, job_id, caller.name, code.name)
            if code is ReturnCode.OK and job_id not in self.sims.printer.jobs:
                await self._remove_job_nodes(job_id)
            elif code is ReturnCode.OK:
                await self.publish()  # the new job state is visible at once
            return _ret(code)

        return handler

    async def _clear_fault(
        self, parent: ua.NodeId, *args: ua.Variant
    ) -> list[ua.Variant] | ua.StatusCode:
        caller = _caller()
        if caller is None or caller.role is not Role.OPERATOR:
            return _ret(ReturnCode.INVALID_REQUEST)
        self.sims.printer.clear_fault()
        return _ret(ReturnCode.OK)

    async def _add_job_nodes(self, job: JobOrder) -> None:
        b = self.builder
        if b is None or self.jobs_folder is None or job.job_id in self.job_nodes:
            return
        safe = re.sub(r"[^A-Za-z0-9_-]", "_", job.job_id)
        path = f"Printer.JobManagement.JobOrderList.{safe}"
        obj = await b.object(
            self.jobs_folder, path, ua.QualifiedName(job.job_id, self.am), _base_object()
        )
        clock = self.sims.clock
        nodes = {"object": obj}
        for key, value, vtype in (
            ("JobOrderId", job.job_id, VT.String),
            ("PatientId", job.patient_id, VT.String),
            ("BatchId", job.batch_id, VT.String),
            ("CellCount", job.cell_count, VT.Double),
            ("BioinkCellDensity", job.bioink_density, VT.Double),
            ("ScheduledStart", clock.timestamp(job.scheduled_start_h), VT.DateTime),
            ("State", job.state.value, VT.String),
            ("Progress", job.progress, VT.Double),
            ("ResultCellsPrinted", 0.0, VT.Double),
            ("ResultBioinkVolume", 0.0, VT.Double),
            ("ResultOutcome", "", VT.String),
            ("EndTime", clock.epoch, VT.DateTime),
        ):
            nodes[key] = await b.variable(
                obj, f"{path}.{key}", ua.QualifiedName(key, self.am), value, vtype
            )
        self.job_nodes[job.job_id] = nodes

    def _isa95_order(self, job: JobOrder) -> Any:
        """A job as OPC 10031-4's ISA95JobOrderAndStateDataType (the structure classes
        asyncua built from the imported NodeSet)."""
        clock = self.sims.clock
        order = ua.ISA95JobOrderDataType(  # type: ignore[attr-defined]
            JobOrderID=job.job_id,
            StartTime=clock.timestamp(job.scheduled_start_h),
            JobOrderParameters=[
                _isa95_parameter("PatientId", job.patient_id, VT.String),
                _isa95_parameter("BatchId", job.batch_id, VT.String),
                _isa95_parameter("CellCount", job.cell_count, VT.Double),
                _isa95_parameter("BioinkCellDensity", job.bioink_density, VT.Double),
            ],
        )
        state = ua.ISA95StateDataType(  # type: ignore[attr-defined]
            BrowsePath=ua.RelativePath(),
            StateText=ua.LocalizedText(job.state.value),
            StateNumber=self.isa95_numbers.get(job.state.value, 0),
        )
        return ua.ISA95JobOrderAndStateDataType(  # type: ignore[attr-defined]
            JobOrder=order, State=[state]
        )

    async def _remove_job_nodes(self, job_id: str) -> None:
        nodes = self.job_nodes.pop(job_id, None)
        if nodes is not None and self.server is not None:
            await self.server.delete_nodes([self.server.get_node(nodes["object"])], recursive=True)

    async def publish(self) -> None:
        server = self.server
        if server is None:
            return
        printer = self.sims.printer
        clock = self.sims.clock
        t = printer.time_h
        stamp = clock.timestamp(t)
        for key, value in printer.monitoring().items():
            await server.write_attribute_value(self.monitoring[key], _dv(value, VT.Double, stamp))
        if self.state_node is not None and self.fault_node is not None:
            await server.write_attribute_value(
                self.state_node,
                _dv(ua.LocalizedText(printer.machine_state()), VT.LocalizedText, stamp),
            )
            await server.write_attribute_value(
                self.fault_node, _dv(printer.fault, VT.String, stamp)
            )
        state_id = self.states.get(printer.machine_state())
        if self.state_id_node is not None and state_id is not None:
            await server.write_attribute_value(self.state_id_node, _dv(state_id, VT.NodeId, stamp))
        if self.isa95_list is not None:
            orders = [self._isa95_order(job) for job in printer.jobs.values()]
            if orders != self.isa95_published:
                self.isa95_published = orders
                await server.write_attribute_value(
                    self.isa95_list,
                    ua.DataValue(
                        Value=ua.Variant(orders, VT.ExtensionObject, is_array=True),
                        SourceTimestamp=_ts(stamp),
                        ServerTimestamp=_ts(datetime.now(UTC)),
                    ),
                )
        for job_id, job in printer.jobs.items():
            if job_id not in self.job_nodes:
                await self._add_job_nodes(job)
            nodes = self.job_nodes[job_id]
            await server.write_attribute_value(
                nodes["State"], _dv(job.state.value, VT.String, stamp)
            )
            await server.write_attribute_value(
                nodes["Progress"], _dv(job.progress, VT.Double, stamp)
            )
            if job.result is not None:
                r = job.result
                results: tuple[tuple[str, Any, ua.VariantType], ...] = (
                    ("ResultCellsPrinted", r.cells_printed, VT.Double),
                    ("ResultBioinkVolume", r.bioink_volume_ml, VT.Double),
                    ("ResultOutcome", r.outcome, VT.String),
                    ("EndTime", clock.timestamp(r.end_time_h), VT.DateTime),
                )
                for label, val, vtype in results:
                    await server.write_attribute_value(nodes[label], _dv(val, vtype, stamp))
        await self._publish_clock(server)


def _isa95_parameter(name: str, value: Any, vtype: ua.VariantType) -> Any:
    return ua.ISA95ParameterDataType(  # type: ignore[attr-defined]
        ID=name, Value=ua.Variant(value, vtype)
    )


def _ret(code: ReturnCode) -> list[ua.Variant]:
    return [ua.Variant(int(code), VT.UInt64)]


# -- the simulators ------------------------------------------------------------------------------
class Simulators:
    """The plant side plus its servers; built by :func:`serve_simulators`."""

    def __init__(self, config: SimulatorConfig) -> None:
        self.config = config
        self.clock = ProcessClock(config.speed)
        now = self.clock.wall()
        self.units = [_make_unit(config, i, now) for i in range(config.units)]
        self.printer = PrinterSim()
        self.faults = FaultBook(config.faults)
        self.bioreactor = BioreactorServer(config, config.port, self)
        self.printer_server: PrinterServer | None = None
        if config.printer_endpoint_port:
            self.printer_server = PrinterServer(config, config.printer_endpoint_port, self)
        self._task: asyncio.Task[None] | None = None
        self._restarts: set[asyncio.Task[None]] = set()
        self.restarting = False
        self._saved_at = -math.inf
        self.restarts_done = 0

    @property
    def servers(self) -> list[_BaseServer]:
        return [s for s in (self.bioreactor, self.printer_server) if s is not None]

    @property
    def endpoint(self) -> str:
        return self.bioreactor.endpoint

    @property
    def printer_endpoint(self) -> str | None:
        return self.printer_server.endpoint if self.printer_server is not None else None

    def process_h(self) -> float:
        """The process time of the plant grid (the published ProcessTime)."""
        return self.units[0].plant.time_h

    def unit(self, name: str) -> BioreactorUnit:
        for unit in self.units:
            if unit.name == name:
                return unit
        raise ConfigError(f"no unit {name!r}; units: {[u.name for u in self.units]}")

    async def start(self) -> None:
        saved = load_plant_state(self.config.state_file)
        for server in self.servers:
            await server.start()
        if saved is None:
            self.clock.reset()  # the batch starts when the servers are up
        else:
            restore_plant_state(self, saved)
        self._saved_at = self.clock.wall()
        self.save_state()
        for nodes in self.bioreactor.nodes.values():
            nodes.published.clear()  # re-stamp the initial values with the new epoch
        await self.publish()
        self._task = asyncio.create_task(self._run(), name="hmpc-sim-plant")
        self._task.add_done_callback(self._plant_done)

    @staticmethod
    def _plant_done(task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.critical("plant loop failed: %r; values are no longer updated", task.exception())

    async def wait_failed(self) -> BaseException:
        """Wait until the plant loop fails (it never ends otherwise) and return the error."""
        if self._task is None:
            raise PlantIOError("the simulators are not running")
        try:
            await asyncio.shield(self._task)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the plant loop's failure is the result here
            return exc
        return PlantIOError("the plant loop ended")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            # a failed plant loop was logged by _plant_done (and reported by wait_failed)
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        for task in list(self._restarts):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for server in self.servers:
            await server.stop()
        self.save_state()

    def save_state(self) -> None:
        """Write the plants' state to the state file (if any), atomically."""
        path = self.config.state_file
        if path is None:
            return
        try:
            save_plant_state(self, path)
        except OSError as exc:  # the plant keeps running; the next save may succeed
            log.error("cannot save the plant state to %s: %s", path, exc)

    async def publish(self) -> None:
        for server in self.servers:
            await server.publish()

    async def restart(self, down_s: float) -> None:
        """Stop the servers for ``down_s`` wall seconds and start them again."""
        log.warning("fault: OPC UA servers restarting (down %.1f s)", down_s)
        self.restarting = True
        try:
            for server in self.servers:
                await server.stop()
            await asyncio.sleep(down_s)
            for server in self.servers:
                await server.start()
            self.restarts_done += 1
            log.warning("fault: OPC UA servers restarted")
        finally:
            self.restarting = False
        await self.publish()

    def step(self) -> None:
        """Advance every unit and the printer to the clock's process time (plant grid)."""
        target = self.clock.process_h()
        dt = self.config.plant_step_h
        max_steps = 1000
        for unit in self.units:
            n = 0
            while unit.plant.time_h + dt <= target + 1e-9 and n < max_steps:
                unit.advance(dt)
                n += 1
            if n == max_steps:
                log.warning(
                    "%s: plant behind the clock by %.1f h", unit.name, target - unit.plant.time_h
                )
        self.printer.advance(self.process_h())

    async def _run(self) -> None:
        while True:
            if not self.restarting:
                await self.bioreactor.read_heartbeats()
            now = self.clock.wall()
            for unit in self.units:
                unit.apc.check_watchdog(now)
            self.step()
            if now - self._saved_at >= self.config.state_interval_s:
                self._saved_at = now
                self.save_state()
            for fault in self.faults.due_events(self.process_h()):
                if fault.kind == "restart":
                    task = asyncio.create_task(self.restart(fault.duration_h or 2.0))
                    self._restarts.add(task)
                    task.add_done_callback(self._restarts.discard)
                elif fault.kind == "printer":
                    self.printer.inject_fault(f"injected fault ({fault.target})", self.process_h())
            if not self.restarting:
                try:
                    await self.publish()
                except (ua.UaError, OSError) as exc:
                    log.warning("publish failed: %s", exc)
            await asyncio.sleep(self.config.tick_s)


# -- plant state across restarts -------------------------------------------------------------------
STATE_VERSION = 1


def _measurement_json(m: Measurement) -> dict[str, Any]:
    return dataclasses.asdict(m)


def save_plant_state(sims: Simulators, path: Path) -> None:
    """The culture of every unit (truth state, time, sensors in transit, setpoints, totals,
    batch id) and the batch epoch, as JSON, written atomically (a kill -9 leaves either the
    previous file or the new one)."""
    units = {}
    for unit in sims.units:
        plant = unit.plant
        readings = plant.readings
        units[unit.name] = {
            "batch_id": unit.batch_id,
            "time_h": plant.time_h,
            "state": [float(v) for v in plant.state],
            "state_names": list(plant.model.state_names),
            "targets": dict(unit.apc.targets),
            "working": dict(unit.apc.working),
            "fallback_setpoints": dict(unit.apc.fallback_setpoints),
            "shed_count": unit.apc.shed_count,
            "totals": dict(unit.totals),
            "functional_state": unit.state,
            "rng": readings.rng.bit_generator.state,
            "pending": [_measurement_json(m) for m in readings.pending],
            "latest": [_measurement_json(m) for m in unit.latest.values()],
            "next_assay": readings.next_assay,
            "clamped_inputs": plant.clamped_inputs,
        }
    data = {
        "version": STATE_VERSION,
        "model": sims.config.model,
        "epoch": sims.clock.epoch.isoformat(),
        "saved_at": datetime.now(UTC).isoformat(),
        "units": units,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        json.dump(data, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def load_plant_state(path: Path | None) -> dict[str, Any] | None:
    """The saved state (None: no state file given, or none written yet)."""
    if path is None or not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read the plant state ({exc})") from exc
    if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
        raise ConfigError(f"{path}: not a plant state file of version {STATE_VERSION}")
    return data


def restore_plant_state(sims: Simulators, data: dict[str, Any]) -> None:
    """Continue the saved batch: same BatchId and BatchStartTime, each culture from its
    saved state; the clock continues as if it had never stopped (the plant catches up on its
    grid, with the fallback setpoints: the restart shed the controller)."""
    path = sims.config.state_file
    if data.get("model") != sims.config.model:
        raise ConfigError(
            f"{path}: the saved plant runs model {data.get('model')!r}, not "
            f"{sims.config.model!r}; remove the file to start a new batch"
        )
    saved = data.get("units", {})
    names = [u.name for u in sims.units]
    if sorted(saved) != sorted(names):
        raise ConfigError(
            f"{path}: the saved plant has units {sorted(saved)}, not {names}; remove the "
            f"file to start a new batch"
        )
    for unit in sims.units:
        u = saved[unit.name]
        plant = unit.plant
        if list(u["state_names"]) != list(plant.model.state_names):
            raise ConfigError(f"{path}: {unit.name}: the saved states are {u['state_names']}")
        plant.state = np.asarray(u["state"], dtype=float)
        plant.time_h = float(u["time_h"])
        plant.clamped_inputs = int(u.get("clamped_inputs", 0))
        readings = plant.readings
        readings.rng.bit_generator.state = u["rng"]
        readings.pending = [Measurement(**m) for m in u["pending"]]
        readings.next_assay = float(u["next_assay"])
        unit.batch_id = str(u["batch_id"])
        unit.state = str(u.get("functional_state", unit.state))
        unit.totals.update({k: float(v) for k, v in u["totals"].items()})
        apc = unit.apc
        apc.working.update({k: float(v) for k, v in u["working"].items()})
        apc.targets.update({k: float(v) for k, v in u["targets"].items()})
        apc.fallback_setpoints = {k: float(v) for k, v in u["fallback_setpoints"].items()}
        apc.shed_count = int(u["shed_count"])
        # the restart lost the controller's session: Local, in the safe state
        apc.mode = Mode.LOCAL
        apc.fallback = True
        apc.targets.update(apc.fallback_setpoints)
        unit.latest.clear()
        for m in (Measurement(**d) for d in u["latest"]):
            unit.latest[(m.source, m.name)] = m
        log.warning(
            "%s: batch %s continued from %s at %.2f h (restart: Local, fallback setpoints %s)",
            unit.name,
            unit.batch_id,
            path,
            plant.time_h,
            apc.fallback_setpoints,
        )
    sims.clock.continue_from(datetime.fromisoformat(data["epoch"]))


@contextlib.asynccontextmanager
async def serve_simulators(config: SimulatorConfig) -> AsyncIterator[Simulators]:
    """Start the bioreactor and printer servers and the plant; always stops them."""
    sims = Simulators(config)
    try:
        await sims.start()
        yield sims
    finally:
        await sims.stop()

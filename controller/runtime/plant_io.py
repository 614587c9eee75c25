"""Plant I/O: the :class:`PlantIO` protocol the control loop talks to, and its OPC UA
implementation (:class:`OpcUaConnection` per server endpoint, :class:`OpcUaPlantIO` per
bioreactor).

The OPC UA side follows the SCADA handshake of docs/opcua.md: inputs arrive by subscription
(sensors with a StatusValueTimestamp trigger, so a value that repeats still refreshes its
timestamp); the controller beats ``Heartbeat`` (UInt32) every ``heartbeat_interval_s`` while
its unit task is alive; the operator grants Remote; setpoints go out as one
``WriteSetpoints(Names, Values)`` bundle with one status per item. Values are converted from
device to canonical units here and nowhere else.

Connections are supervised here rather than by asyncua's auto-reconnect: after a loss the
client is dropped and a new one connects, resolves the namespace indexes again (a restarted
server may number them differently), re-reads the plant limits and re-creates the
subscription. While disconnected every unit reports ``connected = False`` and the loop
writes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import math
import socket
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, cast

from asyncua import Client, ua
from asyncua.crypto import security_policies

from controller.numerics.measurements import Measurement
from controller.runtime.site import InputTag, NodeRef, SecurityConfig, SiteConfig, UnitConfig
from plant_models.errors import ConfigError, PlantIOError

__all__ = [
    "InputState",
    "OpcUaConnection",
    "OpcUaPlantIO",
    "PlantIO",
    "PlantLimits",
    "PlantStatus",
    "ensure_client_certificate",
]

log = logging.getLogger(__name__)

VT = ua.VariantType

_POLICIES = {
    "Basic256Sha256": security_policies.SecurityPolicyBasic256Sha256,
    "Aes128_Sha256_RsaOaep": security_policies.SecurityPolicyAes128Sha256RsaOaep,
    "Aes256_Sha256_RsaPss": security_policies.SecurityPolicyAes256Sha256RsaPss,
}
#: Errors that mean "the plant cannot be reached right now".
COMM_ERRORS: tuple[type[BaseException], ...] = (
    ConnectionError,
    OSError,
    TimeoutError,
    asyncio.TimeoutError,
    ua.UaError,
)


# -- what the loop sees --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class PlantStatus:
    """The plant as the controller sees it now.

    Attributes:
        connected: a session is up and the subscription delivers.
        generation: connection counter (a new value means a reconnect happened).
        remote: the unit is in Remote mode (the controller may write).
        fallback: the plant's watchdog shed the controller.
        clock_h: the plant's published process time (its integration grid), h; NaN unknown.
        now_h: process time now (``clock_h`` extrapolated at the clock speed), h.
        speed: process hours per wall hour.
        batch_id: batch identifier (site file or the plant's ``BatchId``).
        batch_start: the plant's ``BatchStartTime`` (read at each connect; None unknown).
    """

    connected: bool
    generation: int
    remote: bool
    fallback: bool
    clock_h: float
    now_h: float
    speed: float
    batch_id: str
    batch_start: datetime | None = None


@dataclasses.dataclass(frozen=True)
class InputState:
    """Latest value of one input tag (canonical unit)."""

    key: str
    variable: str
    source: str
    value: float
    sample_time_h: float
    quality: str
    required: bool
    max_age_h: float | None


@dataclasses.dataclass(frozen=True)
class PlantLimits:
    """Plant-side limits of each setpoint (canonical units, per process hour).

    ``fallback``: the safe value the plant applies when its watchdog sheds the controller
    (the APC interface's ``FallbackSetpoints``; NaN: the plant holds that setpoint where it
    is); empty when the plant does not publish its fallback."""

    low: Mapping[str, float]
    high: Mapping[str, float]
    rate_up: Mapping[str, float]
    rate_down: Mapping[str, float]
    deadband: Mapping[str, float]
    fallback: Mapping[str, float] = dataclasses.field(default_factory=dict)


#: BatchStartTime differences below this are rounding, not another batch, s
START_TOLERANCE_S = 1.0


class BatchContinuity:
    """Whether the plant is still the one a batch started on: the first status with a
    known clock marks it (BatchId, BatchStartTime, process time); :meth:`check` then says
    why a later status is another plant ('' when it is not): a changed BatchId, a
    BatchStartTime moved by more than :data:`START_TOLERANCE_S`, or a process time that
    went backwards (a restarted or reset plant). Used by the control loop and by the
    closed loop's OPC UA plant."""

    def __init__(self) -> None:
        self.mark: tuple[str, datetime | None, float] | None = None

    def check(self, st: PlantStatus) -> str:
        if not math.isfinite(st.clock_h):
            return ""
        if self.mark is None:
            self.mark = (st.batch_id, st.batch_start, st.clock_h)
            return ""
        batch, start, clock = self.mark
        if st.batch_id != batch:
            return f"the plant's BatchId changed from {batch!r} to {st.batch_id!r}"
        if (
            start is not None
            and st.batch_start is not None
            and abs((st.batch_start - start).total_seconds()) > START_TOLERANCE_S
        ):
            return (
                f"the plant's BatchStartTime changed from {start.isoformat()} to "
                f"{st.batch_start.isoformat()} under BatchId {batch!r}"
            )
        if st.clock_h < clock - 1e-6:
            return (
                f"the plant's process time went back from {clock:.3f} h to {st.clock_h:.3f} h "
                f"under BatchId {batch!r}"
            )
        self.mark = (batch, start or st.batch_start, max(clock, st.clock_h))
        return ""


class PlantIO(Protocol):
    """What the control loop needs of a plant (OPC UA, or an in-process simulation)."""

    unit: str
    setpoint_names: tuple[str, ...]

    def status(self) -> PlantStatus:
        """Connection, mode and clock now (no I/O)."""
        ...

    def inputs(self) -> Mapping[str, InputState]:
        """Latest value of each input tag (no I/O)."""
        ...

    def take_measurements(self) -> list[Measurement]:
        """Measurements received since the last call (canonical units), oldest first."""
        ...

    def limits(self) -> PlantLimits | None:
        """The plant's advertised setpoint limits (None until known)."""
        ...

    async def wait_change(self, timeout_s: float) -> None:
        """Return when anything changed (data, mode, clock, connection) or after the time-out."""
        ...

    async def read_setpoints(self) -> dict[str, float]:
        """The plant's current setpoint targets (canonical units)."""
        ...

    async def write_setpoints(self, values: Mapping[str, float]) -> dict[str, str]:
        """Write one bundle; one status name per variable (``Good``, ``BadOutOfRange``...)."""
        ...

    async def hand_back(self) -> str:
        """Return the unit to Local mode (the plant holds its setpoints)."""
        ...

    def set_alive(self, alive: bool) -> None:
        """Whether the unit's control task runs (the heartbeat beats only while it does)."""
        ...


# -- security helpers ----------------------------------------------------------------------------
async def ensure_client_certificate(security: SecurityConfig) -> None:
    """Create the controller's self-signed application certificate when it is missing and
    ``create_certificate`` is set (URI SAN = ``application_uri``, key mode 0600)."""
    cert, key = security.certificate, security.private_key
    if cert.exists() and key.exists():
        return
    if not security.create_certificate:
        raise ConfigError(
            f"{security.source} [security]: certificate {cert} or key {key} not found; "
            f"set create_certificate = true to generate a self-signed one, or install the "
            f"site's certificate there."
        )
    from asyncua.crypto.cert_gen import setup_self_signed_certificate
    from cryptography.x509.oid import ExtendedKeyUsageOID

    cert.parent.mkdir(parents=True, exist_ok=True)
    key.parent.mkdir(parents=True, exist_ok=True)
    await setup_self_signed_certificate(
        key,
        cert,
        security.application_uri,
        socket.gethostname(),
        [ExtendedKeyUsageOID.CLIENT_AUTH],
        {"commonName": "hmpc controller"},
    )
    key.chmod(0o600)
    log.warning(
        "created the controller certificate %s (URI %s); the plant must trust it (copy it to "
        "the server's trust list)",
        cert,
        security.application_uri,
    )


def _certificate_der(data: bytes) -> bytes | None:
    """DER bytes of a certificate file (DER or PEM); None for anything else (keys...)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        if data.lstrip().startswith(b"-----BEGIN CERTIFICATE"):
            return x509.load_pem_x509_certificate(data).public_bytes(serialization.Encoding.DER)
        return x509.load_der_x509_certificate(data).public_bytes(serialization.Encoding.DER)
    except ValueError:
        return None


def trusted_fingerprints(folder: Path) -> set[str]:
    """SHA-256 fingerprints of the certificates in a trust folder (re-read on every connect)."""
    out: set[str] = set()
    if not folder.is_dir():
        return out
    for f in sorted(folder.iterdir()):
        if f.is_file() and f.suffix.lower() in (".der", ".pem", ".crt", ".cer"):
            der = _certificate_der(f.read_bytes())
            if der is not None:
                out.add(hashlib.sha256(der).hexdigest())
    return out


def _first_certificate(chain: bytes) -> bytes:
    """The leaf certificate of a DER chain (a server may send its chain concatenated)."""
    if len(chain) < 4 or chain[0] != 0x30:
        return chain
    if chain[1] & 0x80:
        n = chain[1] & 0x7F
        length = int.from_bytes(chain[2 : 2 + n], "big") + 2 + n
    else:
        length = chain[1] + 2
    return chain[:length]


# -- OPC UA --------------------------------------------------------------------------------------
class _Handler:
    """Subscription handler: routes each notification to its unit (synchronous, cheap)."""

    def __init__(self, connection: OpcUaConnection) -> None:
        self.connection = connection

    def datachange_notification(self, node: Any, val: Any, data: Any) -> None:
        self.connection._on_data(data.monitored_item.ClientHandle, data.monitored_item.Value)

    def status_change_notification(self, status: Any) -> None:
        log.warning("%s: subscription status %s", self.connection.endpoint, status)


@dataclasses.dataclass
class _Clock:
    clock_h: float = math.nan
    received: float = math.nan  # monotonic wall time of the last change
    batch_start: datetime | None = None
    speed: float = 1.0

    def now_h(self) -> float:
        if not math.isfinite(self.clock_h):
            return math.nan
        return self.clock_h + self.speed * (time.monotonic() - self.received) / 3600.0

    def to_process_h(self, stamp: datetime | None) -> float:
        if stamp is None or self.batch_start is None:
            return math.nan
        if stamp.tzinfo is None:
            stamp = stamp.replace(tzinfo=UTC)
        return (stamp - self.batch_start).total_seconds() / 3600.0


class OpcUaConnection:
    """One supervised client session to one server endpoint, shared by its units.

    ``async with OpcUaConnection(site, endpoint_name) as conn:`` starts the supervisor
    (connect, subscribe, heartbeat; reconnect after a loss) and always disconnects.
    """

    def __init__(self, site: SiteConfig, endpoint_name: str) -> None:
        self.site = site
        self.endpoint_name = endpoint_name
        self.endpoint = site.endpoints[endpoint_name]
        self.units: dict[str, OpcUaPlantIO] = {}
        self.client: Client | None = None
        self.connected = False
        self.generation = 0
        self.clock = _Clock()
        self.last_error = ""
        self._ns: dict[str, int] = {}
        self._handles: dict[int, tuple[OpcUaPlantIO | None, str, str]] = {}
        self._lost = asyncio.Event()
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.supervisor: asyncio.Task[None] | None = None

    # -- units -----------------------------------------------------------------------------
    def add_unit(self, unit: UnitConfig) -> OpcUaPlantIO:
        io = OpcUaPlantIO(self, unit)
        self.units[unit.name] = io
        return io

    def _notify(self, unit: OpcUaPlantIO | None = None) -> None:
        for io in self.units.values() if unit is None else (unit,):
            io._changed.set()

    # -- life cycle ------------------------------------------------------------------------
    async def __aenter__(self) -> OpcUaConnection:
        self.supervisor = asyncio.create_task(self._supervise(), name=f"opcua-{self.endpoint_name}")
        self._tasks = [
            self.supervisor,
            asyncio.create_task(self._heartbeat(), name=f"heartbeat-{self.endpoint_name}"),
        ]
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        self._stop.set()
        self._lost.set()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task  # a supervisor failure was reported by serve()
        self._tasks = []
        await self._drop_client()

    def lost(self, reason: str) -> None:
        """Mark the connection lost (a request failed); the supervisor reconnects."""
        if self.connected:
            log.warning("%s: connection lost: %s", self.endpoint, reason)
        self.last_error = reason
        self.connected = False
        self._lost.set()
        self._notify()

    async def _supervise(self) -> None:
        delay = self.site.timing.reconnect_interval_s
        while not self._stop.is_set():
            self._lost.clear()
            try:
                await self._connect()
            except ConfigError:
                raise
            except COMM_ERRORS as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning(
                    "%s: cannot connect (%s); retrying in %.1f s", self.endpoint, exc, delay
                )
                await self._drop_client()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), delay)
                delay = min(2 * delay, 10 * self.site.timing.reconnect_interval_s, 30.0)
                continue
            delay = self.site.timing.reconnect_interval_s
            self.connected = True
            self.generation += 1
            log.info("%s: connected (generation %d)", self.endpoint, self.generation)
            self._notify()
            await self._lost.wait()
            self.connected = False
            self._notify()
            await self._drop_client()
            if not self._stop.is_set():
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), delay)

    async def _drop_client(self) -> None:
        client, self.client = self.client, None
        self.connected = False
        if client is None:
            return
        with contextlib.suppress(*COMM_ERRORS, asyncio.CancelledError):
            await asyncio.wait_for(client.disconnect(), self.site.timing.request_timeout_s)
        await asyncio.sleep(0.01)  # let the transport's close callback run

    async def _on_connection_lost(self, exc: Exception) -> None:
        self.lost(f"{type(exc).__name__}: {exc}")

    async def _connect(self) -> None:
        sec = self.site.security
        timing = self.site.timing
        client = Client(
            self.endpoint,
            timeout=timing.request_timeout_s,
            watchdog_intervall=min(1.0, timing.heartbeat_interval_s),
        )
        client.application_uri = sec.application_uri
        client.name = "hmpc controller"
        client.session_timeout = 60_000  # ms: the server drops our session a minute after us
        client.set_user(sec.user)
        client.set_password(sec.password())
        if sec.policy != "None":
            await ensure_client_certificate(sec)
            server_cert = await self._server_certificate(sec)
            mode = getattr(ua.MessageSecurityMode, sec.mode)
            await client.set_security(
                cast(Any, _POLICIES[sec.policy]),
                str(sec.certificate),
                str(sec.private_key),
                server_certificate=server_cert,
                mode=mode,
            )
        else:
            log.warning(
                "%s: SecurityPolicy None (allow_insecure): nothing is signed", self.endpoint
            )
        client.connection_lost_callback = self._on_connection_lost
        self.client = client
        await asyncio.wait_for(client.connect(), 3 * timing.request_timeout_s)
        namespaces = await client.get_namespace_array()
        self._ns = {uri: i for i, uri in enumerate(namespaces)}
        await self._read_static()
        await self._subscribe()

    async def _server_certificate(self, sec: SecurityConfig) -> bytes | None:
        """The server's certificate, checked against the trust folder (None: asyncua takes
        whatever the server presents; only without ``trusted_servers``)."""
        if sec.trusted_servers is None:
            log.warning(
                "%s: no trusted_servers folder; the server certificate is not verified",
                self.endpoint,
            )
            return None
        probe = Client(self.endpoint, timeout=self.site.timing.request_timeout_s)
        try:
            endpoints = await probe.connect_and_get_server_endpoints()
        finally:
            await asyncio.sleep(0.01)
        policy_uri = _POLICIES[sec.policy].URI
        mode = getattr(ua.MessageSecurityMode, sec.mode)
        chosen = [
            e for e in endpoints if e.SecurityPolicyUri == policy_uri and e.SecurityMode == mode
        ]
        if not chosen:
            raise ConfigError(
                f"{sec.source} [security]: {self.endpoint} offers no endpoint with policy "
                f"{sec.policy} and mode {sec.mode}."
            )
        der = _first_certificate(chosen[0].ServerCertificate)
        fingerprint = hashlib.sha256(der).hexdigest()
        if fingerprint not in trusted_fingerprints(sec.trusted_servers):
            rejected = sec.trusted_servers.parent / "rejected"
            rejected.mkdir(parents=True, exist_ok=True)
            saved = rejected / f"server-{fingerprint[:16]}.der"
            saved.write_bytes(der)
            raise PlantIOError(
                f"{self.endpoint}: server certificate (SHA-256 {fingerprint[:16]}...) is not "
                f"trusted; if it is the plant's, move {saved} to {sec.trusted_servers}."
            )
        return der

    def node_id(self, ref: NodeRef) -> ua.NodeId:
        """Resolve a namespace URI to this session's index (never cached across sessions)."""
        if not ref.uri:
            return ua.NodeId(ua.Int32(int(ref.identifier)), ua.Int16(0))
        index = self._ns.get(ref.uri)
        if index is None:
            raise PlantIOError(
                f"{self.endpoint}: namespace {ref.uri!r} of node {ref} is not on the server; "
                f"check the site file's node ids."
            )
        if ref.kind == "i":
            return ua.NodeId(ua.Int32(int(ref.identifier)), ua.Int16(index))
        if ref.kind == "g":
            return ua.NodeId(ua.Guid(ref.identifier), ua.Int16(index))
        return ua.NodeId(ua.String(ref.identifier), ua.Int16(index))

    async def read(self, ref: NodeRef) -> Any:
        client = self._client()
        dv = await client.get_node(self.node_id(ref)).read_data_value(raise_on_bad_status=False)
        if dv.StatusCode is not None and not dv.StatusCode.is_good():
            raise PlantIOError(f"{self.endpoint}: reading {ref} gave {dv.StatusCode.name}")
        return None if dv.Value is None else dv.Value.Value

    def _client(self) -> Client:
        if self.client is None or (not self.connected and self._lost.is_set()):
            raise PlantIOError(f"{self.endpoint}: not connected ({self.last_error or 'starting'})")
        return self.client

    async def _read_static(self) -> None:
        clock = self.site.clock
        start = await self.read(clock.batch_start)
        if not isinstance(start, datetime):
            raise PlantIOError(f"{self.endpoint}: {clock.batch_start} is not a DateTime")
        self.clock.batch_start = start if start.tzinfo else start.replace(tzinfo=UTC)
        speed = await self.read(clock.speed) if clock.speed is not None else 1.0
        self.clock.speed = float(speed) if isinstance(speed, int | float) and speed > 0 else 1.0
        for io in self.units.values():
            await io._read_static()

    async def _subscribe(self) -> None:
        client = self._client()
        timing = self.site.timing
        interval = timing.publishing_interval_ms
        keepalive = max(1, round(1000.0 / interval))  # a keep-alive about every second
        params = ua.CreateSubscriptionParameters(
            RequestedPublishingInterval=interval,
            RequestedLifetimeCount=max(3 * keepalive, round(60_000.0 / interval)),
            RequestedMaxKeepAliveCount=keepalive,
            MaxNotificationsPerPublish=0,
            PublishingEnabled=True,
            Priority=0,
        )
        sub = await client.create_subscription(params, _Handler(self))
        self._handles = {}
        requests: list[ua.MonitoredItemCreateRequest] = []

        def item(
            node: ua.NodeId, owner: OpcUaPlantIO | None, kind: str, key: str, timestamps: bool
        ) -> None:
            handle = len(self._handles) + 1
            self._handles[handle] = (owner, kind, key)
            params = ua.MonitoringParameters()
            params.ClientHandle = handle
            params.SamplingInterval = 0.0
            params.QueueSize = 4
            params.DiscardOldest = True
            if timestamps:
                params.Filter = ua.DataChangeFilter(
                    Trigger=ua.DataChangeTrigger.StatusValueTimestamp
                )
            request = ua.MonitoredItemCreateRequest()
            request.ItemToMonitor = ua.ReadValueId(NodeId=node, AttributeId=ua.AttributeIds.Value)
            request.MonitoringMode = ua.MonitoringMode.Reporting
            request.RequestedParameters = params
            requests.append(request)

        clock = self.site.clock
        item(self.node_id(clock.process_time), None, "clock", "process_time", False)
        for io in self.units.values():
            for tag in io.config.inputs:
                item(self.node_id(tag.node), io, "input", tag.key, True)
            for child in ("Mode", "Fallback", "Setpoints"):
                item(self.node_id(io.config.apc.child(child)), io, "apc", child, False)
        results = await sub.create_monitored_items(requests)
        for request, result in zip(requests, results, strict=True):
            if isinstance(result, ua.StatusCode):
                _, kind, key = self._handles[request.RequestedParameters.ClientHandle]
                raise PlantIOError(
                    f"{self.endpoint}: cannot subscribe to {kind} {key} "
                    f"({request.ItemToMonitor.NodeId.to_string()}): {result.name}; check the "
                    f"site file's tag map."
                )

    def _on_data(self, handle: int, dv: ua.DataValue | None) -> None:
        entry = self._handles.get(handle)
        if entry is None or dv is None:
            return
        owner, kind, key = entry
        value = None if dv.Value is None else dv.Value.Value
        if kind == "clock":
            if isinstance(value, int | float) and math.isfinite(value):
                if value != self.clock.clock_h:
                    self.clock.clock_h = float(value)
                    self.clock.received = time.monotonic()
                self._notify()
            return
        if owner is not None:
            owner._on_data(kind, key, value, dv)

    async def _heartbeat(self) -> None:
        """Beat every live unit's heartbeat every ``heartbeat_interval_s`` (a UInt32 change)."""
        interval = self.site.timing.heartbeat_interval_s
        while not self._stop.is_set():
            if self.connected and self.client is not None:
                for io in list(self.units.values()):
                    if io.alive:
                        await io._beat()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stop.wait(), interval)


class OpcUaPlantIO:
    """One bioreactor over a shared :class:`OpcUaConnection` (implements :class:`PlantIO`)."""

    def __init__(self, connection: OpcUaConnection, config: UnitConfig) -> None:
        self.connection = connection
        self.config = config
        self.unit = config.name
        self.setpoint_names = tuple(s.variable for s in config.setpoints)
        self.alive = False
        self.heartbeats = 0
        self._counter = int(time.time()) % 1_000_000  # any change is a beat
        self._changed = asyncio.Event()
        self._tags: dict[str, InputTag] = {t.key: t for t in config.inputs}
        self._latest: dict[str, InputState] = {}
        self._pending: list[Measurement] = []
        self._mode: int | None = None
        self._fallback = False
        self._targets: list[float] | None = None
        self._names: list[str] = []
        self._limits: PlantLimits | None = None
        self._batch_id = config.batch_id or ""

    # -- PlantIO ---------------------------------------------------------------------------
    def status(self) -> PlantStatus:
        c = self.connection
        return PlantStatus(
            connected=c.connected,
            generation=c.generation,
            remote=c.connected and self._mode == 1,
            fallback=self._fallback,
            clock_h=c.clock.clock_h,
            now_h=c.clock.now_h(),
            speed=c.clock.speed,
            batch_id=self._batch_id or self.unit,
            batch_start=c.clock.batch_start,
        )

    def inputs(self) -> Mapping[str, InputState]:
        return dict(self._latest)

    def take_measurements(self) -> list[Measurement]:
        out, self._pending = self._pending, []
        return out

    def limits(self) -> PlantLimits | None:
        return self._limits

    def set_alive(self, alive: bool) -> None:
        self.alive = alive

    async def wait_change(self, timeout_s: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout_s)
        self._changed.clear()

    async def read_setpoints(self) -> dict[str, float]:
        names, values = await self._request(self._read_names_and_targets())
        by_item = dict(zip(names, values, strict=True))
        out: dict[str, float] = {}
        for sp in self.config.setpoints:
            if sp.item not in by_item:
                raise PlantIOError(
                    f"{self.unit}: the plant has no setpoint {sp.item!r} (it offers {names})."
                )
            out[sp.variable] = sp.conversion.to_canonical(float(by_item[sp.item]))
        return out

    async def write_setpoints(self, values: Mapping[str, float]) -> dict[str, str]:
        tags = [sp for sp in self.config.setpoints if sp.variable in values]
        items = [sp.item for sp in tags]
        device = [float(sp.conversion.to_device(values[sp.variable])) for sp in tags]
        c = self.connection
        try:
            client = c._client()
            obj = client.get_node(c.node_id(self.config.apc))
            method = c.node_id(self.config.apc.child("WriteSetpoints"))
            result = await asyncio.wait_for(
                obj.call_method(
                    method,
                    ua.Variant(items, VT.String, is_array=True),
                    ua.Variant(device, VT.Double, is_array=True),
                ),
                c.site.timing.request_timeout_s,
            )
        except ua.UaStatusCodeError as exc:
            name = ua.StatusCode(exc.code).name
            log.warning("%s: WriteSetpoints refused as a whole: %s", self.unit, name)
            return {sp.variable: name for sp in tags}
        except COMM_ERRORS as exc:
            c.lost(f"WriteSetpoints: {type(exc).__name__}: {exc}")
            return {sp.variable: "BadCommunicationError" for sp in tags}
        codes = result if isinstance(result, list) else [result]
        if len(codes) != len(tags):
            log.error(
                "%s: WriteSetpoints returned %d statuses for %d items",
                self.unit,
                len(codes),
                len(tags),
            )
            return {sp.variable: "BadUnexpectedError" for sp in tags}
        return {
            sp.variable: (
                code.name
                if isinstance(code, ua.StatusCode)
                else ua.StatusCode(ua.UInt32(code)).name
            )
            for sp, code in zip(tags, codes, strict=True)
        }

    async def hand_back(self) -> str:
        c = self.connection
        try:
            client = c._client()
            obj = client.get_node(c.node_id(self.config.apc))
            result = await asyncio.wait_for(
                obj.call_method(
                    c.node_id(self.config.apc.child("RequestMode")), ua.Variant(0, VT.Int32)
                ),
                c.site.timing.request_timeout_s,
            )
        except ua.UaStatusCodeError as exc:
            return ua.StatusCode(exc.code).name
        except COMM_ERRORS as exc:
            return f"BadCommunicationError ({exc})"
        return result.name if isinstance(result, ua.StatusCode) else str(result)

    # -- internals -------------------------------------------------------------------------
    async def _request(self, coro: Any) -> Any:
        c = self.connection
        try:
            return await asyncio.wait_for(coro, c.site.timing.request_timeout_s)
        except PlantIOError:
            raise
        except COMM_ERRORS as exc:
            c.lost(f"{type(exc).__name__}: {exc}")
            raise PlantIOError(f"{self.unit}: {type(exc).__name__}: {exc}") from exc

    async def _read_names_and_targets(self) -> tuple[list[str], list[float]]:
        c = self.connection
        names = await c.read(self.config.apc.child("SetpointNames"))
        values = await c.read(self.config.apc.child("Setpoints"))
        if not isinstance(names, list) or not isinstance(values, list) or len(names) != len(values):
            raise PlantIOError(f"{self.unit}: SetpointNames/Setpoints are not matching arrays")
        return [str(n) for n in names], [float(v) for v in values]

    async def _read_static(self) -> None:
        """At each (re)connect: batch id, setpoint names and the plant's limits."""
        c = self.connection
        apc = self.config.apc
        if not self.config.batch_id:
            batch = await c.read(apc.child("BatchId"))
            self._batch_id = str(batch) if batch else self.unit
        names = [str(n) for n in await c.read(apc.child("SetpointNames"))]
        self._names = names
        missing = [sp.item for sp in self.config.setpoints if sp.item not in names]
        if missing:
            raise PlantIOError(
                f"{self.unit}: the plant offers setpoints {names}, not {missing}; fix the "
                f"site file's [setpoints] item names."
            )
        arrays = {}
        for key in ("SetpointLow", "SetpointHigh", "RateUp", "RateDown", "Deadband"):
            values = await c.read(apc.child(key))
            arrays[key] = dict(zip(names, (float(v) for v in values), strict=True))

        def span(value: float, scale: float) -> float:
            return math.inf if value >= 1e299 else abs(value * scale)

        low: dict[str, float] = {}
        high: dict[str, float] = {}
        up: dict[str, float] = {}
        down: dict[str, float] = {}
        dead: dict[str, float] = {}
        for sp in self.config.setpoints:
            conv = sp.conversion
            a = conv.to_canonical(arrays["SetpointLow"][sp.item])
            b = conv.to_canonical(arrays["SetpointHigh"][sp.item])
            low[sp.variable], high[sp.variable] = min(a, b), max(a, b)
            up[sp.variable] = span(arrays["RateUp"][sp.item], conv.scale)
            down[sp.variable] = span(arrays["RateDown"][sp.item], conv.scale)
            dead[sp.variable] = span(arrays["Deadband"][sp.item], conv.scale)
        fallback: dict[str, float] = {}
        try:  # the safe state on shed; a plant may not publish it (then it is unknown)
            raw = dict(
                zip(
                    names,
                    (float(v) for v in await c.read(apc.child("FallbackSetpoints"))),
                    strict=True,
                )
            )
        except PlantIOError as exc:
            log.warning("%s: the plant publishes no FallbackSetpoints (%s)", self.unit, exc)
        else:
            for sp in self.config.setpoints:
                value = raw[sp.item]
                fallback[sp.variable] = (
                    sp.conversion.to_canonical(value) if math.isfinite(value) else math.nan
                )
        self._limits = PlantLimits(low, high, up, down, dead, fallback)

    async def _beat(self) -> None:
        c = self.connection
        self._counter = (self._counter + 1) % 2**32
        try:
            client = c._client()
            node = client.get_node(c.node_id(self.config.apc.child("Heartbeat")))
            await asyncio.wait_for(
                node.write_value(ua.Variant(self._counter, VT.UInt32)),
                c.site.timing.request_timeout_s,
            )
            self.heartbeats += 1
        except ua.UaStatusCodeError as exc:
            log.error("%s: heartbeat refused: %s", self.unit, ua.StatusCode(exc.code).name)
        except COMM_ERRORS as exc:
            c.lost(f"heartbeat: {type(exc).__name__}: {exc}")

    def _on_data(self, kind: str, key: str, value: Any, dv: ua.DataValue) -> None:
        if kind == "apc":
            if key == "Mode" and isinstance(value, int):
                self._mode = value
            elif key == "Fallback" and isinstance(value, bool):
                self._fallback = value
            elif key == "Setpoints" and isinstance(value, list):
                self._targets = [float(v) for v in value]
            self._changed.set()
            return
        tag = self._tags.get(key)
        if tag is None:
            return
        clock = self.connection.clock
        sample = clock.to_process_h(dv.SourceTimestamp)
        code = dv.StatusCode if dv.StatusCode is not None else ua.StatusCode(ua.UInt32(0))
        quality = "good" if code.is_good() else "uncertain" if code.is_uncertain() else "bad"
        raw = (
            float(value)
            if isinstance(value, int | float) and not isinstance(value, bool)
            else math.nan
        )
        canonical = tag.conversion.to_canonical(raw) if math.isfinite(raw) else math.nan
        if not math.isfinite(canonical) and quality == "good":
            quality = "bad"
        if not math.isfinite(sample):
            return  # a placeholder without a timestamp: nothing was measured yet
        previous = self._latest.get(key)
        if (
            previous is not None
            and sample <= previous.sample_time_h + 1e-9
            and (
                previous.value == canonical
                or (math.isnan(previous.value) and math.isnan(canonical))
            )
            and previous.quality == quality
        ):
            return  # the same sample again (initial value after a reconnect)
        self._latest[key] = InputState(
            key, tag.variable, tag.source, canonical, sample, quality, tag.required, tag.max_age_h
        )
        arrival = clock.now_h()
        arrival = max(sample, arrival) if math.isfinite(arrival) else sample
        self._pending.append(
            Measurement(
                tag.variable,
                canonical,
                tag.conversion.canonical_unit,
                sample,
                arrival,
                tag.source,
                quality,
            )
        )
        self._changed.set()

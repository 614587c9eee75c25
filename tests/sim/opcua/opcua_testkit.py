"""Shared helpers of the OPC UA simulator tests (a uniquely named module, so tests can import
it whatever other conftest.py files exist): a PKI folder with users and a trusted client
certificate, free loopback ports, and the simulators running on their own event loop in a
thread (started once per test session, always stopped). Tests talk to them with real asyncua
clients under ``asyncio.run``."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from asyncua import Client, ua
from asyncua.common.utils import create_nonce
from asyncua.crypto.cert_gen import setup_self_signed_certificate
from asyncua.crypto.security_policies import (
    SecurityPolicyAes128Sha256RsaOaep,
    SecurityPolicyAes256Sha256RsaPss,
    SecurityPolicyBasic256Sha256,
)
from cryptography.x509.oid import ExtendedKeyUsageOID

from sim.opcua.apc import Role
from sim.opcua.lads import HMPC_URI
from sim.opcua.recording import SimulatorThread
from sim.opcua.security import write_user
from sim.opcua.server import SimulatorConfig

T = TypeVar("T")

PASSWORDS = {
    "apc": "apc-secret",
    "operator": "op-secret",
    "viewer": "view-secret",
    "engineer": "eng",
}
ROLES = {
    "apc": Role.APC,
    "operator": Role.OPERATOR,
    "viewer": Role.VIEWER,
    "engineer": Role.ENGINEER,
}
CLIENT_URI = "urn:hmpc:test:client"
POLICIES = {
    "Basic256Sha256": SecurityPolicyBasic256Sha256,
    "Aes128_Sha256_RsaOaep": SecurityPolicyAes128Sha256RsaOaep,
    "Aes256_Sha256_RsaPss": SecurityPolicyAes256Sha256RsaPss,
}


def free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@dataclasses.dataclass(frozen=True)
class Pki:
    folder: Path
    client_cert: Path
    client_key: Path
    untrusted_cert: Path
    untrusted_key: Path
    other_trusted_cert: Path | None = None
    other_trusted_key: Path | None = None


def _client_cert(folder: Path, name: str, uri: str) -> tuple[Path, Path]:
    cert, key = folder / f"{name}_cert.der", folder / f"{name}_key.pem"
    asyncio.run(
        setup_self_signed_certificate(
            key, cert, uri, "localhost", [ExtendedKeyUsageOID.CLIENT_AUTH], {"commonName": name}
        )
    )
    return cert, key


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    for name, password in PASSWORDS.items():
        write_user(folder / "users.toml", name, ROLES[name], password, iterations=1000)
    clients = tmp_path_factory.mktemp("clients")
    cert, key = _client_cert(clients, "client", CLIENT_URI)
    bad_cert, bad_key = _client_cert(clients, "stranger", "urn:hmpc:test:stranger")
    (folder / "trusted").mkdir(parents=True, exist_ok=True)
    (folder / "trusted" / "client.der").write_bytes(cert.read_bytes())
    other_cert, other_key = _client_cert(clients, "other", CLIENT_URI)
    (folder / "trusted" / "other.der").write_bytes(other_cert.read_bytes())
    return Pki(folder, cert, key, bad_cert, bad_key, other_cert, other_key)


#: The simulators on an event loop in a background thread (sim.opcua.recording).
SimThread = SimulatorThread


@pytest.fixture(scope="session")
def sim(pki: Pki) -> Iterator[SimThread]:
    port, printer_port = free_ports(2)
    config = SimulatorConfig(
        port=port,
        printer_port=printer_port,
        units=2,
        speed=3600.0,
        patient_seed=7,
        pki=pki.folder,
        heartbeat_timeout_s=2.0,
    )
    thread = SimThread(config).start()
    try:
        yield thread
    finally:
        thread.close()


class _Client(Client):  # type: ignore[misc]
    """asyncua Client whose disconnect lets the loop run the transport's close callback,
    so ``asyncio.run`` does not close the loop over an open socket (ResourceWarning)."""

    async def disconnect(self) -> None:
        try:
            await super().disconnect()
        finally:
            await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def session(
    endpoint: str,
    pki: Pki,
    user: str | None = "apc",
    *,
    password: str | None = None,
    policy: str = "Basic256Sha256",
    mode: ua.MessageSecurityMode = ua.MessageSecurityMode.SignAndEncrypt,
    untrusted: bool = False,
    auto_reconnect: bool = False,
) -> AsyncIterator[Client]:
    """A connected client session, always closed (socket included); ``auto_reconnect``: the
    standard asyncua supervisor that reconnects and re-creates subscriptions."""
    client = _Client(endpoint, timeout=10)
    client.application_uri = "urn:hmpc:test:stranger" if untrusted else CLIENT_URI
    cert, key = (
        (pki.untrusted_cert, pki.untrusted_key) if untrusted else (pki.client_cert, pki.client_key)
    )
    await client.set_security(POLICIES[policy], str(cert), str(key), mode=mode)
    if user is not None:
        client.set_user(user)
        client.set_password(password if password is not None else PASSWORDS[user])
    try:
        await client.connect(auto_reconnect=auto_reconnect)
    except BaseException:
        await asyncio.sleep(0.01)  # let the refused connection's transport close
        raise
    try:
        yield client
    finally:
        await client.disconnect()


async def node(client: Client, path: str) -> Any:
    ns = await client.get_namespace_index(HMPC_URI)
    return client.get_node(ua.NodeId(path, ns))


class RogueClient(_Client):
    """A client that opens its secure channel with its own (untrusted) key pair and then,
    in CreateSession, claims another certificate: ``claimed`` (e.g. a trusted peer's
    *public* certificate) or none at all. It skips the client-side check of the server's
    signature (which covers the channel certificate, not the claimed one), as an attacker
    would. Everything else is the standard asyncua client."""

    claimed: bytes | None = None

    async def create_session(self) -> ua.CreateSessionResult:
        desc = ua.ApplicationDescription()
        desc.ApplicationUri = self.application_uri
        desc.ProductUri = self.product_uri
        desc.ApplicationName = ua.LocalizedText(self.name)
        desc.ApplicationType = ua.ApplicationType.Client
        params = ua.CreateSessionParameters()
        params.ServerUri = self.server_uri
        params.ClientNonce = create_nonce(32)
        params.ClientCertificate = self.claimed
        params.ClientDescription = desc
        params.EndpointUrl = self.server_url.geturl()
        params.SessionName = "rogue session"
        params.RequestedSessionTimeout = self.session_timeout
        params.MaxResponseMessageSize = 0
        response = await self.uaclient.create_session(params)
        self._server_nonce = response.ServerNonce
        if not self.security_policy.peer_certificate:
            self.security_policy.peer_certificate = response.ServerCertificate
        ep = Client.find_endpoint(
            response.ServerEndpoints, self.security_policy.Mode, self.security_policy.URI
        )
        self._policy_ids = ep.UserIdentityTokens
        self.session_timeout = response.RevisedSessionTimeout
        return response


@contextlib.asynccontextmanager
async def rogue_session(
    endpoint: str,
    pki: Pki,
    claimed: bytes | None,
    *,
    policy: str = "Basic256Sha256",
    mode: ua.MessageSecurityMode = ua.MessageSecurityMode.SignAndEncrypt,
    user: str = "apc",
    trusted_channel: bool = False,
) -> AsyncIterator[Client]:
    """A :class:`RogueClient` session: channel opened with the untrusted key pair (or the
    trusted client's, ``trusted_channel``), CreateSession carrying ``claimed``, announcing
    the trusted client's ApplicationUri."""
    client = RogueClient(endpoint, timeout=10)
    client.application_uri = CLIENT_URI
    client.claimed = claimed
    cert, key = (
        (pki.client_cert, pki.client_key)
        if trusted_channel
        else (pki.untrusted_cert, pki.untrusted_key)
    )
    await client.set_security(POLICIES[policy], str(cert), str(key), mode=mode)
    client.set_user(user)
    client.set_password(PASSWORDS[user])
    try:
        await client.connect()
    except BaseException:
        await asyncio.sleep(0.01)
        raise
    try:
        yield client
    finally:
        await client.disconnect()


@contextlib.contextmanager
def own_sim(pki: Pki, **settings: Any) -> Iterator[SimThread]:
    """A simulator of its own (one unit, no printer) with ``settings`` of
    :class:`SimulatorConfig`, for tests that change its state for good (lock-outs)."""
    (port,) = free_ports(1)
    config = SimulatorConfig(
        port=port, printer_port=0, units=1, speed=3600.0, pki=pki.folder, **settings
    )
    thread = SimThread(config).start()
    try:
        yield thread
    finally:
        thread.close()


async def wrong_logins(
    endpoint: str,
    pki: Pki,
    attempts: int,
    *,
    user: str = "apc",
    password: str = "wrong",  # noqa: S107
) -> list[str]:
    """One connection (trusted certificate, secure channel, one session) that tries
    ActivateSession ``attempts`` times with ``password``; the outcome of each (a status name,
    ``Good`` or the exception's type)."""
    client = _Client(endpoint, timeout=30)
    client.application_uri = CLIENT_URI
    await client.set_security(POLICIES["Basic256Sha256"], str(pki.client_cert), str(pki.client_key))
    outcomes: list[str] = []
    try:
        await client.connect_socket()
        await client.send_hello()
        await client.open_secure_channel()
        await client.create_session()
        for _ in range(attempts):
            try:
                await client.activate_session(user, password)
                outcomes.append("Good")
            except ua.UaStatusCodeError as exc:
                outcomes.append(type(exc).__name__)
            except (ConnectionError, OSError, TimeoutError) as exc:
                outcomes.append(type(exc).__name__)
                break
    finally:
        client.disconnect_socket()
        await asyncio.sleep(0.01)
    return outcomes

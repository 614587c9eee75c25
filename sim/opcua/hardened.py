"""An asyncua server hardened where asyncua 2.1.0 is not (issue 23; docs/opcua.md, Security).

asyncua runs the server as ``Server -> BinaryServer -> OPCUAProtocol -> UaProcessor``. The
subclasses here change four things and otherwise leave asyncua's code paths alone:

- **The channel certificate is the client's identity.** asyncua validates only the
  certificate a client *claims* in CreateSession, and skips the check when none is claimed;
  the certificate whose key signed the OpenSecureChannel is never compared with the trust
  list. :class:`_Processor` refuses an OpenSecureChannel whose certificate is not in the
  trust list, requires the CreateSession certificate on secure endpoints and requires it to
  be the channel certificate (then the trust list checks validity and ApplicationUri), and
  requires a session re-activated on a new channel to come with the same certificate. Every
  refusal is logged with the client's address and the certificate's SHA-1 thumbprint.
- **Passwords are checked off the event loop.** asyncua calls the user manager's
  synchronous ``get_user`` inside ActivateSession, on the loop. :class:`_Processor` checks
  the password first, through :class:`sim.opcua.security.LoginGuard` (worker threads, back-off,
  lock-out, a cap on pending checks), and hands the verdict to asyncua's ActivateSession
  through :data:`PREAUTHENTICATED`; :class:`PreauthenticatedUsers` (the user manager asyncua
  sees) only returns that verdict and never hashes.
- **A cap on connections without an activated session** (:class:`_Protocol`).
- **Stopping completes whatever clients do** (:class:`_BinaryServer`). asyncua closes the
  client transports first and the listening socket one loop turn later, then waits for
  every connection to end; a client that reconnects in between (``auto_reconnect=True``)
  holds the stop until it goes away. Here the listening socket closes first, then every
  transport is aborted, and the wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import socket
from typing import Any, cast

from asyncua import Server, ua
from asyncua.common.utils import ServiceError
from asyncua.crypto import uacrypto
from asyncua.crypto.permission_rules import User
from asyncua.crypto.security_policies import SecurityPolicyNone
from asyncua.server.binary_server_asyncio import BinaryServer, OPCUAProtocol
from asyncua.server.internal_session import InternalSession
from asyncua.server.uaprocessor import UaProcessor
from asyncua.ua.ua_binary import struct_from_binary, uatcp_to_binary
from cryptography import x509

from sim.opcua.security import FolderTrustList, LoginGuard, first_certificate, thumbprint

__all__ = [
    "MIN_PUBLISHING_INTERVAL_MS",
    "PREAUTHENTICATED",
    "GuardedSession",
    "HardenedServer",
    "PreauthenticatedUsers",
]

log = logging.getLogger(__name__)

#: The shortest publishing interval granted (ms): the plant publishes every tick (50 ms by
#: default), so a faster subscription only re-sends the same values. Requests below it
#: (0 included, which asyncua would grant as "as fast as possible") are revised up to it.
MIN_PUBLISHING_INTERVAL_MS = 50.0

#: The user whose password :class:`_Processor` has verified for the ActivateSession being
#: processed (None: not verified). Read by :class:`PreauthenticatedUsers`.
PREAUTHENTICATED: contextvars.ContextVar[User | None] = contextvars.ContextVar(
    "hmpc_opcua_preauthenticated", default=None
)

_ACTIVATE = ua.NodeId(ua.Int32(ua.ObjectIds.ActivateSessionRequest_Encoding_DefaultBinary))
_CREATE = ua.NodeId(ua.Int32(ua.ObjectIds.CreateSessionRequest_Encoding_DefaultBinary))
#: Stopping waits this long for asyncua's own shutdown once every transport is aborted.
STOP_TIMEOUT_S = 10.0


class PreauthenticatedUsers:
    """The user manager asyncua calls inside ActivateSession: it returns the user whose
    password :class:`_Processor` verified off the loop, and refuses everyone else
    (anonymous, certificate tokens, a request that did not pass the check). No hashing."""

    def get_user(
        self,
        iserver: Any,
        username: str | None = None,
        password: str | None = None,
        certificate: Any = None,
    ) -> User | None:
        user = PREAUTHENTICATED.get()
        if user is None or not username or user.name != username:
            log.warning("login refused: anonymous, certificate or unverified user token")
            return None
        return user


class GuardedSession(InternalSession):
    """A session that remembers the certificate it was created with and revises
    publishing intervals below :data:`MIN_PUBLISHING_INTERVAL_MS`."""

    certificate_thumbprint: str | None = None
    preauthenticated: User | None = None

    def activate_session(
        self, params: ua.ActivateSessionParameters, peer_certificate: bytes | None
    ) -> ua.ActivateSessionResult:
        user, self.preauthenticated = self.preauthenticated, None
        token = PREAUTHENTICATED.set(user)
        try:
            return super().activate_session(params, peer_certificate)
        finally:
            PREAUTHENTICATED.reset(token)

    async def create_subscription(
        self,
        params: ua.CreateSubscriptionParameters,
        callback: Any,
        request_callback: Any = None,
    ) -> ua.CreateSubscriptionResult:
        requested = params.RequestedPublishingInterval
        if not requested >= MIN_PUBLISHING_INTERVAL_MS:  # NaN, 0 and negative included
            log.info(
                "publishing interval %r ms revised to %.0f ms",
                requested,
                MIN_PUBLISHING_INTERVAL_MS,
            )
            params.RequestedPublishingInterval = MIN_PUBLISHING_INTERVAL_MS
        return await super().create_subscription(params, callback, request_callback)


class _Refused(Exception):
    """An OpenSecureChannel refused: the Error message is sent, the connection closes."""


class _Processor(UaProcessor):
    trust: FolderTrustList
    guard: LoginGuard

    def _address(self) -> str:
        name = self.name
        return f"{name[0]}:{name[1]}" if isinstance(name, tuple) and len(name) >= 2 else str(name)

    def _channel_certificate(self) -> bytes | None:
        policy = self._connection.security_policy
        if policy.URI == SecurityPolicyNone.URI or policy.peer_certificate is None:
            return None
        return first_certificate(policy.peer_certificate)

    def _refuse(self, code: int, der: bytes | None, why: str) -> ServiceError:
        print_ = thumbprint(der) if der else "none"
        log.warning(
            "session refused for %s (certificate thumbprint %s): %s", self._address(), print_, why
        )
        return ServiceError(code)

    async def process(self, header: Any, body: Any) -> bool:
        try:
            return bool(await super().process(header, body))
        except _Refused:
            return False

    def open_secure_channel(self, algohdr: Any, seqhdr: Any, body: Any) -> None:
        if not self._connection.is_open() and algohdr.SenderCertificate:
            der = first_certificate(algohdr.SenderCertificate)
            if not self.trust.is_trusted(der):
                self.trust.reject(der, f"OpenSecureChannel from {self._address()}")
                log.warning(
                    "secure channel refused for %s (certificate thumbprint %s): not in the "
                    "trust list",
                    self._address(),
                    thumbprint(der),
                )
                error = ua.ErrorMessage(
                    ua.StatusCode(ua.UInt32(ua.StatusCodes.BadCertificateUntrusted)),
                    ua.String("certificate not trusted"),
                )
                self._transport.write(uatcp_to_binary(cast(Any, ua.MessageType.Error), error))
                raise _Refused
        super().open_secure_channel(algohdr, seqhdr, body)

    async def _process_message(self, typeid: Any, requesthdr: Any, seqhdr: Any, body: Any) -> Any:
        if typeid == _CREATE:
            await self._check_create(struct_from_binary(ua.CreateSessionParameters, body.copy()))
            result = await super()._process_message(typeid, requesthdr, seqhdr, body)
            if isinstance(self.session, GuardedSession):
                channel = self._channel_certificate()
                self.session.certificate_thumbprint = thumbprint(channel) if channel else None
            return result
        if typeid == _ACTIVATE:
            await self._check_activate(
                requesthdr, struct_from_binary(ua.ActivateSessionParameters, body.copy())
            )
        return await super()._process_message(typeid, requesthdr, seqhdr, body)

    async def _check_create(self, params: ua.CreateSessionParameters) -> None:
        policy = self._connection.security_policy
        if policy.URI == SecurityPolicyNone.URI:
            return  # --dev-insecure: no application authentication on None
        channel = self._channel_certificate()
        claimed = first_certificate(params.ClientCertificate) if params.ClientCertificate else None
        if channel is None:
            raise self._refuse(
                ua.StatusCodes.BadSecurityChecksFailed, claimed, "secure channel has no certificate"
            )
        if claimed is None:
            raise self._refuse(
                ua.StatusCodes.BadCertificateInvalid,
                channel,
                "CreateSession without ClientCertificate on a secure endpoint",
            )
        if claimed != channel:
            raise self._refuse(
                ua.StatusCodes.BadCertificateInvalid,
                channel,
                f"CreateSession claims another certificate (thumbprint {thumbprint(claimed)}) "
                "than the one that opened the secure channel",
            )
        try:
            await self.trust(x509.load_der_x509_certificate(channel), params.ClientDescription)
        except ServiceError as exc:
            raise self._refuse(exc.code, channel, ua.StatusCode(ua.UInt32(exc.code)).name) from None

    async def _check_activate(self, requesthdr: Any, params: ua.ActivateSessionParameters) -> None:
        session = self.session or self.iserver.lookup_external_session(
            requesthdr.AuthenticationToken
        )
        if not isinstance(session, GuardedSession):
            return  # asyncua refuses: BadSessionIdInvalid
        channel = self._channel_certificate()
        here = thumbprint(channel) if channel else None
        if here != session.certificate_thumbprint:
            raise self._refuse(
                ua.StatusCodes.BadSecurityChecksFailed,
                channel,
                f"ActivateSession on a channel whose certificate is not the session's "
                f"({session.certificate_thumbprint})",
            )
        policy = self._connection.security_policy
        nonce = session.nonce or b""
        data = nonce if policy.host_certificate is None else policy.host_certificate + nonce
        try:
            policy.asymmetric_cryptography.verify(data, params.ClientSignature.Signature)
        except Exception:
            raise self._refuse(
                ua.StatusCodes.BadApplicationSignatureInvalid, channel, "client signature invalid"
            ) from None
        token = params.UserIdentityToken
        if not isinstance(token, ua.UserNameIdentityToken):
            return  # PreauthenticatedUsers refuses it
        try:
            username, password = self.iserver.decrypt_user_token(session, token)
        except Exception:
            raise ServiceError(ua.StatusCodes.BadIdentityTokenInvalid) from None
        user = await self.guard.login(
            username,
            password,
            address=self._address().rsplit(":", 1)[0],
            thumbprint=here or "none",
        )
        if user is None:
            raise ServiceError(ua.StatusCodes.BadUserAccessDenied)
        session.preauthenticated = user


class _Protocol(OPCUAProtocol):
    max_unauthenticated: int = 32
    trust: FolderTrustList
    guard: LoginGuard

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        pending = sum(
            1
            for c in self.clients
            if c.processor is None
            or c.processor.session is None
            or not c.processor.session.is_activated()
        )
        if pending >= self.max_unauthenticated:
            log.warning(
                "connection from %s refused: %d connections without an activated session "
                "(limit %d)",
                transport.get_extra_info("peername"),
                pending,
                self.max_unauthenticated,
            )
            error = ua.ErrorMessage(
                ua.StatusCode(ua.UInt32(ua.StatusCodes.BadTcpNotEnoughResources)),
                ua.String("too many connections without a session"),
            )
            cast(asyncio.Transport, transport).write(
                uatcp_to_binary(cast(Any, ua.MessageType.Error), error)
            )
            transport.close()  # the client is told why (asyncua's client logs it)
            return
        super().connection_made(transport)
        if self.processor is not None and self.transport is not None:
            processor = _Processor(self.iserver, self.transport, self.limits)
            processor.set_policies(self.policies)
            processor.trust = self.trust
            processor.guard = self.guard
            self.processor = processor


class _BinaryServer(BinaryServer):
    max_unauthenticated: int
    trust: FolderTrustList
    guard: LoginGuard

    def _make_protocol(self) -> OPCUAProtocol:
        protocol = _Protocol(
            iserver=self.iserver,
            policies=self._policies,
            clients=self.clients,
            closing_tasks=self.closing_tasks,
            limits=self.limits,
        )
        protocol.max_unauthenticated = self.max_unauthenticated
        protocol.trust = self.trust
        protocol.guard = self.guard
        return protocol

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()  # no new connections from here on (reconnecting clients)
        for transport in list(self.iserver.asyncio_transports):
            transport.abort()
        try:
            await asyncio.wait_for(super().stop(), STOP_TIMEOUT_S)
        except TimeoutError:
            log.warning(
                "server stop: connections still open after %.0f s; abandoned", STOP_TIMEOUT_S
            )


class HardenedServer(Server):
    """asyncua ``Server`` with the checks of this module. ``trust`` and ``guard`` must be
    set before :meth:`start`; the user manager must be :class:`PreauthenticatedUsers`."""

    trust: FolderTrustList
    guard: LoginGuard
    max_unauthenticated: int = 32

    async def stop(self) -> None:
        """asyncua's stop, then close the sessions it keeps for reconnecting clients (an
        activated session with subscriptions outlives its connection, Part 4 6.7, and
        would keep its timers and publishing loop running after the server is gone)."""
        try:
            await super().stop()
        finally:
            sessions = list(getattr(self.iserver, "_external_sessions", {}).values())
            for session in sessions:
                await session.close_session(True)

    async def start(self) -> None:
        # Server.start with _BinaryServer in place of BinaryServer (asyncua 2.1.0).
        if self.iserver.certificate is not None:
            uacrypto.check_certificate(
                self.iserver.certificate, self._application_uri, socket.gethostname()
            )
        await self._setup_server_nodes()
        await self.iserver.start()
        try:
            ipaddress, port = self._get_bind_socket_info()
            bserver = _BinaryServer(
                self.iserver, cast(str, ipaddress), cast(int, port), self.limits
            )
            bserver.max_unauthenticated = self.max_unauthenticated
            bserver.trust = self.trust
            bserver.guard = self.guard
            bserver.set_policies(self._policies)
            self.bserver = bserver
            await bserver.start()
        except Exception:
            await self.iserver.stop()
            raise
